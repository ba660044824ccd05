//! The readiness backend, for hosts where io_uring is blocked (Docker's default seccomp profile,
//! `kernel.io_uring_disabled`, old kernels): epoll, driving the same loop and state machines as the
//! io_uring driver by producing the same completion-shaped events.
//!
//! Each socket is registered once, edge-triggered, for input and output. The backend remembers per
//! descriptor whether input is waiting (an edge seen and not yet read dry) and whether the owner
//! wants it; a wanted, waiting socket is read once per loop turn into the worker's one receive
//! buffer, so that a busy connection cannot starve the others and backpressure (not wanting input)
//! takes effect at the next turn. A send is attempted at once; its outcome (bytes written, or 0
//! when the socket is full, reported again when it has room) is queued as an event for the next
//! wait, like a completion.
//!
//! Must never: read a socket whose owner does not want input, or drop an edge (a socket read to
//! a full buffer stays on the ready list until a read comes back short).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::backend::{Backend, BackendCounters, Event, Received};
use super::outgoing::{Outgoing, SendBuf};
use super::stamp;
use super::token::{Op, Token};

/// The worker's receive buffer: one for every connection, borrowed for the length of one handler.
pub const RECV_BUFFER_SIZE: usize = 64 * 1024;
/// Events taken from the kernel per wait.
const EVENTS_PER_WAIT: usize = 1024;
/// Connections accepted per listener per readiness event, so that one busy listener cannot starve
/// the established connections.
const ACCEPTS_PER_EVENT: usize = 64;

/// A socket's epoll data is its descriptor. The marker for a listener: the top bit set, the listener's index below.
const LISTENER_TAG: u64 = 1 << 63;
/// The marker for the wake-up descriptor.
const WAKE_TAG: u64 = (1 << 63) | (1 << 62);

/// What the backend knows about one registered socket.
#[derive(Clone, Copy, Default)]
struct FdState {
    token: u64,
    registered: bool,
    /// An input edge (or EOF, or error) seen and not yet read dry.
    readable: bool,
    /// The peer's FIN (or a hang-up or error) was reported: read until the end shows, since no
    /// further edge will announce it.
    hup: bool,
    /// The owner wants input.
    want_read: bool,
    /// On the ready list already.
    queued: bool,
    /// A send found the socket full and waits for room.
    send_blocked: bool,
    /// A connect waits for the socket to become writable.
    connecting: bool,
}

/// The epoll backend of one worker.
pub struct EpollBackend {
    epoll: RawFd,
    wake_fd: RawFd,
    /// Per descriptor number (descriptors are small, dense integers).
    fds: Vec<FdState>,
    /// Sockets with input waiting that their owner wants, in turn order.
    ready: VecDeque<RawFd>,
    /// Outcomes of sends and connects, delivered at the next wait.
    pending: VecDeque<Event<'static>>,
    /// Listeners by index, and whether accepting is on.
    listeners: Vec<(RawFd, bool)>,
    buffer: Box<[u8]>,
    events: Vec<libc::epoll_event>,
    counters: BackendCounters,
    /// Whether `epoll_pwait2` is there (cleared at its first ENOSYS).
    precise_wait: bool,
    /// Receives read the kernel's receive time ([`Backend::stamp_receives`]).
    stamped: bool,
}

fn cvt(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(result) }
}

impl EpollBackend {
    /// An epoll instance watching `wake_fd` (an eventfd) for cross-thread wake-ups.
    pub fn new(wake_fd: RawFd) -> io::Result<EpollBackend> {
        // SAFETY: epoll_create1 has no memory-safety requirements.
        let epoll = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let backend = EpollBackend {
            epoll,
            wake_fd,
            fds: Vec::new(),
            ready: VecDeque::new(),
            pending: VecDeque::new(),
            listeners: Vec::new(),
            buffer: vec![0; RECV_BUFFER_SIZE].into_boxed_slice(),
            events: Vec::with_capacity(EVENTS_PER_WAIT),
            counters: BackendCounters::default(),
            precise_wait: true,
            stamped: false,
        };
        backend.register(wake_fd, libc::EPOLLIN as u32, WAKE_TAG)?;
        Ok(backend)
    }

    fn register(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: data };
        // SAFETY: `event` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) }).map(drop)
    }

    fn state(&mut self, fd: RawFd) -> &mut FdState {
        let index = fd as usize;
        if self.fds.len() <= index {
            self.fds.resize(index + 1, FdState::default());
        }
        &mut self.fds[index]
    }

    fn mark_ready(&mut self, fd: RawFd) {
        let state = self.state(fd);
        if state.readable && state.want_read && !state.queued {
            state.queued = true;
            self.ready.push_back(fd);
        }
    }

    /// Waits for events into `self.events`, for at most `timeout` (`None`: no limit), with
    /// nanosecond precision where the kernel has `epoll_pwait2` (5.11): a paced sender (the load
    /// generator) must wake within microseconds of its due time, not at the next millisecond.
    fn epoll_wait(&mut self, timeout: Option<Duration>) -> libc::c_int {
        let events = self.events.as_mut_ptr();
        if self.precise_wait {
            let ts = timeout.map(|t| libc::timespec {
                tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            });
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
            // SAFETY: `events` has room for EVENTS_PER_WAIT events, `ts_ptr` is null or points to
            // a live timespec, and a null signal mask leaves the mask alone.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.epoll,
                    events,
                    EVENTS_PER_WAIT as libc::c_int,
                    ts_ptr,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            } as libc::c_int;
            if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return n;
            }
            self.precise_wait = false;
        }
        let timeout_ms = match timeout {
            None => -1,
            Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
        };
        // SAFETY: the vector has room for EVENTS_PER_WAIT events; the kernel writes at most that.
        unsafe { libc::epoll_wait(self.epoll, events, EVENTS_PER_WAIT as i32, timeout_ms) }
    }

    /// One read of `fd` into the receive buffer: its result, and the kernel's receive time when
    /// receive timestamps are on ([`Backend::stamp_receives`]).
    fn receive(&mut self, fd: RawFd) -> (isize, Option<u64>) {
        if !self.stamped {
            // SAFETY: the buffer is valid and writable for its whole length.
            let n = unsafe {
                libc::recv(fd, self.buffer.as_mut_ptr().cast(), self.buffer.len(), libc::MSG_DONTWAIT)
            };
            return (n, None);
        }
        let mut control = [0u64; stamp::CONTROL_LEN / 8];
        let mut iov = libc::iovec { iov_base: self.buffer.as_mut_ptr().cast(), iov_len: self.buffer.len() };
        let mut header = stamp::recvmsg_header();
        header.msg_iov = &raw mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        // SAFETY: the header points to the buffer and the control array, both live and writable
        // for the lengths given, for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &raw mut header, libc::MSG_DONTWAIT) };
        let written = header.msg_controllen.min(stamp::CONTROL_LEN);
        // SAFETY: the control array is CONTROL_LEN bytes, of which the kernel wrote `written`.
        let bytes = unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), written) };
        (n, stamp::timestamp(bytes))
    }

    /// Reads `fd` once into the receive buffer and reports what came.
    fn read_once(&mut self, fd: RawFd, handle: &mut dyn FnMut(Event<'_>)) {
        let state = self.state(fd);
        state.queued = false;
        if !(state.readable && state.want_read) {
            return;
        }
        let token = Token(state.token);
        let (n, arrived) = self.receive(fd);
        if n > 0 {
            let n = n as usize;
            if n == self.buffer.len() {
                // Maybe more: read again next turn (the edge will not come again).
                self.state(fd).queued = true;
                self.ready.push_back(fd);
            } else if !self.state(fd).hup {
                // Read dry: a new edge comes with new data (or the FIN).
                self.state(fd).readable = false;
            } else {
                // The FIN is already behind this data: read again to see it.
                self.state(fd).queued = true;
                self.ready.push_back(fd);
            }
            let received = Received::Data(&mut self.buffer[..n]);
            handle(Event::Recv { token, received, more: true, arrived });
            return;
        }
        let error = io::Error::last_os_error();
        if n < 0 && matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
            self.state(fd).readable = false;
            return;
        }
        let state = self.state(fd);
        state.readable = false;
        state.want_read = false;
        let received = if n == 0 || error.kind() == io::ErrorKind::ConnectionReset {
            Received::Eof
        } else {
            Received::Error(error)
        };
        handle(Event::Recv { token, received, more: false, arrived: None });
    }

    /// Hands out the queued outcomes of sends and connects, then reads each socket on the ready
    /// list once (a socket read to a full buffer goes back on the list for the next turn).
    /// Returns how many it handled.
    fn deliver_queued(&mut self, handle: &mut dyn FnMut(Event<'_>)) -> usize {
        let delivered = self.pending.len() + self.ready.len();
        while let Some(event) = self.pending.pop_front() {
            handle(event);
        }
        for _ in 0..self.ready.len() {
            let Some(fd) = self.ready.pop_front() else { break };
            self.read_once(fd, handle);
        }
        delivered
    }

    fn accept_some(&mut self, index: usize, handle: &mut dyn FnMut(Event<'_>)) {
        let (listener, on) = self.listeners[index];
        if !on {
            return;
        }
        for _ in 0..ACCEPTS_PER_EVENT {
            // SAFETY: null address pointers ask for no peer address.
            let fd = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                handle(Event::Accepted { listener: index, result: Ok(fd), more: true });
                continue;
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => return,
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                _ => {
                    // Out of descriptors or memory, or the listener was shut down: the loop backs
                    // off and starts accepting again.
                    self.listeners[index].1 = false;
                    handle(Event::Accepted { listener: index, result: Err(error), more: false });
                    return;
                }
            }
        }
        // More may be waiting: the listener is level-triggered, the next wait reports it again.
    }

    fn on_socket_event(&mut self, fd: RawFd, events: u32) {
        let state = *self.state(fd);
        if !state.registered {
            return;
        }
        let token = Token(state.token);
        let failed = events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        if events & (libc::EPOLLOUT as u32) != 0 || failed {
            if state.connecting {
                self.state(fd).connecting = false;
                let result = socket_error(fd);
                self.pending.push_back(Event::Connected { token: token.with_op(Op::Connect), result });
            } else if state.send_blocked {
                self.state(fd).send_blocked = false;
                self.pending.push_back(Event::Sent { token: token.with_op(Op::Send), result: Ok(0) });
            }
        }
        if events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
            let state = self.state(fd);
            state.readable = true;
            state.hup |= events & (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            self.mark_ready(fd);
        }
    }
}

/// The outcome of a non-blocking connect, once the socket is writable.
fn socket_error(fd: RawFd) -> io::Result<()> {
    let mut error: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `error` and `len` are valid for writes of the sizes given.
    let result =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut error).cast(), &mut len) };
    cvt(result)?;
    if error == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(error)) }
}

impl Drop for EpollBackend {
    fn drop(&mut self) {
        // SAFETY: we own the epoll descriptor.
        unsafe { libc::close(self.epoll) };
    }
}

impl Backend for EpollBackend {
    fn name(&self) -> &'static str {
        "epoll"
    }

    fn attach(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        // Accepted sockets come non-blocking (accept4); upstream sockets are made so.
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        self.register(fd, events, fd as u64)?;
        *self.state(fd) = FdState { token: token.0, registered: true, ..FdState::default() };
        Ok(())
    }

    fn accept(&mut self, index: usize, listener: RawFd) {
        if self.listeners.len() <= index {
            self.listeners.resize(index + 1, (-1, false));
        }
        let known = self.listeners[index].0 == listener;
        self.listeners[index] = (listener, true);
        if !known {
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let flags = libc::fcntl(listener, libc::F_GETFL);
                libc::fcntl(listener, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            if let Err(error) = self.register(listener, libc::EPOLLIN as u32, LISTENER_TAG | index as u64) {
                self.pending.push_back(Event::Accepted { listener: index, result: Err(error), more: false });
            }
        }
    }

    fn start_recv(&mut self, fd: RawFd, _token: Token) {
        self.state(fd).want_read = true;
        self.mark_ready(fd);
    }

    fn stop_recv(&mut self, fd: RawFd, _token: Token) -> bool {
        self.state(fd).want_read = false;
        false
    }

    fn send(&mut self, fd: RawFd, token: Token, out: &mut Outgoing) {
        let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
        let n = match out.prepare() {
            // SAFETY: `bytes` is valid for reads of its length.
            SendBuf::Slice(bytes) => unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), flags) },
            // SAFETY: the header and its iovecs describe live frames of `out`, unchanged until
            // this call returns.
            SendBuf::Message(header) => unsafe { libc::sendmsg(fd, header, flags) },
        };
        let token = token.with_op(Op::Send);
        if n >= 0 {
            self.pending.push_back(Event::Sent { token, result: Ok(n as usize) });
            return;
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            // Full: the next EPOLLOUT edge reports `Ok(0)`, and the owner sends again.
            io::ErrorKind::WouldBlock => self.state(fd).send_blocked = true,
            io::ErrorKind::Interrupted => self.pending.push_back(Event::Sent { token, result: Ok(0) }),
            _ => self.pending.push_back(Event::Sent { token, result: Err(error) }),
        }
    }

    fn connect(&mut self, fd: RawFd, token: Token, addr: &socket2::SockAddr) {
        let token = token.with_op(Op::Connect);
        // SAFETY: `addr` points to a valid socket address of `addr.len()` bytes.
        let result = unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len()) };
        if result == 0 {
            self.pending.push_back(Event::Connected { token, result: Ok(()) });
            return;
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EINPROGRESS) {
            self.state(fd).connecting = true;
        } else {
            self.pending.push_back(Event::Connected { token, result: Err(error) });
        }
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(state) = self.fds.get_mut(fd as usize) {
            *state = FdState::default();
        }
        // Closing removes the descriptor from the epoll set (it is never duplicated).
        // SAFETY: the caller owns `fd` and has nothing in flight on it.
        unsafe { libc::close(fd) };
    }

    fn upstream_socket(&self, addr: SocketAddr) -> io::Result<Socket> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        let _ = socket.set_tcp_nodelay(true);
        Ok(socket)
    }

    fn wait(&mut self, timeout: Option<Duration>, handle: &mut dyn FnMut(Event<'_>)) -> io::Result<()> {
        self.counters.turns += 1;
        // Outcomes queued since the last wait, then one read for each socket still readable.
        // Whatever they hand out must be acted on before the loop may sleep.
        let delivered = self.deliver_queued(handle);
        self.counters.events += delivered as u64;
        let busy = delivered > 0 || !self.ready.is_empty() || !self.pending.is_empty();
        let timeout = if busy { Some(Duration::ZERO) } else { timeout };
        self.events.clear();
        let n = self.epoll_wait(timeout);
        if n < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(error) };
        }
        // SAFETY: the kernel initialised the first `n` events.
        unsafe { self.events.set_len(n as usize) };
        let events = std::mem::take(&mut self.events);
        for event in &events {
            let (data, flags) = (event.u64, event.events);
            self.counters.events += 1;
            if data == WAKE_TAG {
                let mut value = 0u64;
                // SAFETY: an 8-byte read into a u64.
                unsafe { libc::read(self.wake_fd, (&raw mut value).cast(), 8) };
                handle(Event::Woken);
            } else if data & LISTENER_TAG != 0 {
                self.accept_some((data & !LISTENER_TAG) as usize, handle);
            } else {
                self.on_socket_event(data as RawFd, flags);
            }
        }
        self.events = events;
        // Sends and connects that just became possible, then the input that just arrived (counted
        // above, as the epoll events that announced them).
        self.deliver_queued(handle);
        Ok(())
    }

    fn stamp_receives(&mut self) {
        self.stamped = true;
    }

    fn coalesce_waits(&mut self, _window: Duration) -> bool {
        // epoll_wait returns at the first event; it has no minimum wait.
        false
    }

    fn rearm_budget(&self) -> usize {
        // Reads share one buffer and never run dry.
        usize::MAX
    }

    fn counters(&self) -> BackendCounters {
        self.counters
    }
}
