//! Our io_uring driver: one ring per worker thread and no async runtime between it and the
//! connections.
//!
//! Receives are multishot (`RECV` with `IORING_RECV_MULTISHOT`) into the worker's provided-buffer
//! ring (`bufring`): one submission per connection for as long as it reads, the kernel choosing the
//! buffer when data arrives. Accepts are multishot too. A send is one `SEND` from the connection's
//! [`Outgoing`]. Every completion carries a [`Token`]; one `io_uring_enter` per loop turn submits
//! everything queued and reaps what completed (`GETEVENTS`, which `DEFER_TASKRUN` needs to run
//! completion work at all).
//!
//! Sockets stay blocking: io_uring waits for readiness itself, and a non-blocking socket would make
//! it return `EAGAIN` to us instead.
//!
//! Must never: recycle a buffer before its handler returned, lose a completion (a full
//! submission queue is submitted and retried, an overflowing completion queue is flushed by the
//! next enter), or free anything an operation in flight points to (the owners keep it until the
//! completion: see [`Backend`]).

pub mod bufring;
pub mod ring;
pub mod slab;
pub mod timer;

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::types::{self, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use socket2::{Domain, Protocol, Socket, Type};

use super::backend::{Backend, BackendCounters, Event, Received};
use super::outgoing::{Outgoing, SendBuf};
use super::stamp;
use super::token::{Op, Token};
use bufring::BufRing;
pub use ring::Setup;

/// The buffer group of the worker's receive pool.
const BUFFER_GROUP: u16 = 0;
/// Receive buffers per worker: enough for a burst of small messages on many connections at once;
/// when they run out, receives stop with ENOBUFS and start again once buffers are back (nothing
/// is lost, the data waits in the socket). `RINGGATE_RECV_BUFFERS` (a power of two) overrides it,
/// for tests that exhaust the ring on purpose and for sizing experiments.
pub const RECV_BUFFERS: u16 = 512;

fn recv_buffers() -> u16 {
    std::env::var("RINGGATE_RECV_BUFFERS")
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|n| n.is_power_of_two())
        .unwrap_or(RECV_BUFFERS)
}
/// Bytes per receive buffer: a typical message and its frame header fit, as do a batch of
/// pipelined small messages.
pub const RECV_BUFFER_SIZE: u32 = 8192;

/// How the driver was set up, for the log and `/metrics`.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// The ring's flags.
    pub setup: Setup,
    /// Bytes of the receive pool.
    pub pool_bytes: usize,
}

/// The io_uring backend of one worker.
pub struct UringBackend {
    // Declared first so that it is dropped first: closing the ring unregisters the buffer ring
    // before its memory is unmapped.
    ring: IoUring,
    buffers: BufRing,
    wake_fd: RawFd,
    /// Where the wake-up read lands; boxed so that its address is stable while the read is queued.
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// Completions copied out of the queue, so that handlers may use the backend's buffers.
    reaped: Vec<cqueue::Entry>,
    counters: BackendCounters,
    setup: Setup,
    /// `--coalesce-wait` in microseconds, when the kernel supports it (0: off).
    coalesce_wait_us: u32,
    /// Registered-file slots by descriptor, when `RINGGATE_URING_FIXED_FILES=1` (an experiment:
    /// receives and sends then name the socket by its slot, sparing the kernel a file lookup).
    fixed: Option<FixedFiles>,
    /// The header multishot `RECVMSG` receives read their layout from, once receive timestamps are
    /// on ([`Backend::stamp_receives`]); boxed, since the kernel reads it while receives run.
    stamped: Option<Box<libc::msghdr>>,
}

/// A sparse registered-file table and which descriptor sits in which slot.
struct FixedFiles {
    /// `slot_of[fd]`: the slot of descriptor `fd`, or `u32::MAX`.
    slot_of: Vec<u32>,
    free: Vec<u32>,
}

/// An SQE's target: the registered slot of `fd` if it has one, else the plain descriptor.
macro_rules! target {
    ($self:expr, $fd:expr, $build:expr) => {
        match $self
            .fixed
            .as_ref()
            .and_then(|f| f.slot_of.get($fd as usize).copied())
            .filter(|s| *s != u32::MAX)
        {
            Some(slot) => $build(types::Fixed(slot)),
            None => $build(Fd($fd)),
        }
    };
}

/// Completions a coalescing wait asks for before its window ends.
const COALESCE_BATCH: usize = 64;

impl UringBackend {
    /// A ring (the best `setup` this kernel allows, at most `best`) with a registered receive pool,
    /// reading `wake_fd` (an eventfd) for cross-thread wake-ups.
    pub fn new(best: Setup, wake_fd: RawFd) -> io::Result<UringBackend> {
        UringBackend::with_coalesce_wait(best, wake_fd, Duration::ZERO)
    }

    /// Like [`UringBackend::new`]; an idle worker sleeps up to `coalesce_wait` for a batch of
    /// completions before it wakes for the first (ignored, with a warning, before Linux 6.12).
    pub fn with_coalesce_wait(
        best: Setup,
        wake_fd: RawFd,
        coalesce_wait: Duration,
    ) -> io::Result<UringBackend> {
        let (ring, setup) = ring::build_ring(best)?;
        let buffers = BufRing::new(recv_buffers(), RECV_BUFFER_SIZE)?;
        // SAFETY: the ring memory stays mapped until `buffers` is dropped, which happens after
        // `ring` (field order), whose closing unregisters the group.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                buffers.ring_addr(),
                buffers.count(),
                BUFFER_GROUP,
                0,
            )?;
        }
        let mut coalesce_wait_us = coalesce_wait.as_micros().min(u128::from(u32::MAX)) as u32;
        if coalesce_wait_us > 0 && !ring.params().is_feature_min_timeout() {
            tracing::warn!("--coalesce-wait needs Linux 6.12 (IORING_FEAT_MIN_TIMEOUT); ignored");
            coalesce_wait_us = 0;
        }
        let fixed = fixed_files(&ring);
        Ok(UringBackend {
            stamped: None,
            fixed,
            coalesce_wait_us,
            ring,
            buffers,
            wake_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
            reaped: Vec::with_capacity(1024),
            counters: BackendCounters::default(),
            setup,
        })
    }

    /// What the driver got from the kernel.
    pub fn features(&self) -> Features {
        Features { setup: self.setup, pool_bytes: self.buffers.footprint() }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry we build points only into memory its owner keeps alive until the
            // completion (the `Backend` contract), or into `self` (the wake-up buffer).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full: hand what is queued to the kernel and try again.
            if let Err(error) = self.ring.submit() {
                if error.raw_os_error() != Some(libc::EBUSY) {
                    tracing::warn!(%error, "io_uring submit failed");
                }
                // EBUSY: completions must be reaped first; they will be at this turn's wait, and
                // the ring keeps them (NODROP). Submitting again after reaping makes room.
                let _ = self.ring.submitter().submit_and_wait(0);
            }
        }
    }

    fn arm_wake(&mut self) {
        if !self.wake_armed {
            let buf = std::ptr::from_mut::<u64>(&mut self.wake_buf).cast::<u8>();
            let entry =
                opcode::Read::new(Fd(self.wake_fd), buf, 8).build().user_data(Token::global(Op::Wake, 0).0);
            self.push(entry);
            self.wake_armed = true;
        }
    }

    fn enter(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let ready = !self.ring.completion().is_empty();
        let want = if ready || timeout == Some(Duration::ZERO) { 0 } else { 1 };
        let submitter = self.ring.submitter();
        let result = if want > 0 && self.coalesce_wait_us > 0 {
            // Sleep for a batch, but no longer than the coalescing window once one has come, and
            // never past the timeout (a timer due sooner than the window shortens it).
            let window = match timeout {
                Some(timeout) => self.coalesce_wait_us.min(timeout.as_micros().max(1) as u32),
                None => self.coalesce_wait_us,
            };
            let args = SubmitArgs::new().min_wait_usec(window);
            match timeout {
                Some(timeout) => {
                    let ts = Timespec::from(timeout);
                    submitter.submit_with_args(COALESCE_BATCH, &args.timespec(&ts))
                }
                None => submitter.submit_with_args(COALESCE_BATCH, &args),
            }
        } else {
            match timeout {
                Some(timeout) if want > 0 => {
                    let ts = Timespec::from(timeout);
                    let args = SubmitArgs::new().timespec(&ts);
                    submitter.submit_with_args(want, &args)
                }
                _ => submitter.submit_and_wait(want),
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(error) => match error.raw_os_error() {
                // Timed out, interrupted, or completions must be reaped before more submissions.
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => Ok(()),
                _ => Err(error),
            },
        }
    }
}

/// The registered-file table, if `RINGGATE_URING_FIXED_FILES=1` asks for it and the kernel
/// gives one as large as the open-file limit.
fn fixed_files(ring: &IoUring) -> Option<FixedFiles> {
    if std::env::var("RINGGATE_URING_FIXED_FILES").as_deref() != Ok("1") {
        return None;
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let slots = limit.rlim_cur.min(1 << 20) as u32;
    match ring.submitter().register_files_sparse(slots) {
        Ok(()) => Some(FixedFiles { slot_of: Vec::new(), free: (0..slots).rev().collect() }),
        Err(error) => {
            tracing::warn!(%error, "cannot register a file table; using plain descriptors");
            None
        }
    }
}

fn result_of(cqe: &cqueue::Entry) -> io::Result<usize> {
    let result = cqe.result();
    if result < 0 { Err(io::Error::from_raw_os_error(-result)) } else { Ok(result as usize) }
}

impl Backend for UringBackend {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn attach(&mut self, fd: RawFd, _token: Token) -> io::Result<()> {
        let Some(fixed) = self.fixed.as_mut() else { return Ok(()) };
        let Some(slot) = fixed.free.pop() else { return Ok(()) };
        if self.ring.submitter().register_files_update(slot, &[fd]).is_err() {
            fixed.free.push(slot);
            return Ok(());
        }
        let index = fd as usize;
        if fixed.slot_of.len() <= index {
            fixed.slot_of.resize(index + 1, u32::MAX);
        }
        fixed.slot_of[index] = slot;
        Ok(())
    }

    fn accept(&mut self, index: usize, listener: RawFd) {
        let entry = opcode::AcceptMulti::new(Fd(listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(Token::global(Op::Accept, index as u32).0);
        self.push(entry);
    }

    fn start_recv(&mut self, fd: RawFd, token: Token) {
        let entry = match self.stamped.as_deref() {
            Some(header) => {
                let header: *const libc::msghdr = header;
                target!(self, fd, |t| opcode::RecvMsgMulti::new(t, header, BUFFER_GROUP).build())
            }
            None => target!(self, fd, |t| opcode::RecvMulti::new(t, BUFFER_GROUP).build()),
        };
        self.push(entry.user_data(token.with_op(Op::Recv).0));
    }

    fn stop_recv(&mut self, _fd: RawFd, token: Token) -> bool {
        let entry = opcode::AsyncCancel::new(token.with_op(Op::Recv).0)
            .build()
            .user_data(token.with_op(Op::Cancel).0);
        self.push(entry);
        true
    }

    fn send(&mut self, fd: RawFd, token: Token, out: &mut Outgoing) {
        let entry = match out.prepare() {
            SendBuf::Slice(bytes) => {
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                target!(self, fd, |t| opcode::Send::new(t, bytes.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build())
            }
            SendBuf::Message(header) => target!(self, fd, |t| opcode::SendMsg::new(t, header)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()),
        };
        self.push(entry.user_data(token.with_op(Op::Send).0));
    }

    fn connect(&mut self, fd: RawFd, token: Token, addr: &socket2::SockAddr) {
        let entry = opcode::Connect::new(Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .user_data(token.with_op(Op::Connect).0);
        self.push(entry);
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(fixed) = self.fixed.as_mut()
            && let Some(slot) = fixed.slot_of.get_mut(fd as usize)
            && *slot != u32::MAX
        {
            let _ = self.ring.submitter().register_files_update(*slot, &[-1]);
            fixed.free.push(*slot);
            *slot = u32::MAX;
        }
        // SAFETY: the caller owns `fd` and has nothing in flight on it.
        unsafe { libc::close(fd) };
    }

    fn upstream_socket(&self, addr: SocketAddr) -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
        let _ = socket.set_tcp_nodelay(true);
        Ok(socket)
    }

    fn wait(&mut self, timeout: Option<Duration>, handle: &mut dyn FnMut(Event<'_>)) -> io::Result<()> {
        self.arm_wake();
        self.enter(timeout)?;
        self.counters.turns += 1;
        let mut reaped = std::mem::take(&mut self.reaped);
        {
            let mut completion = self.ring.completion();
            completion.sync();
            self.counters.cq_overflows = u64::from(completion.overflow());
            reaped.extend(completion.by_ref());
        }
        self.counters.events += reaped.len() as u64;
        for cqe in &reaped {
            let token = Token(cqe.user_data());
            let flags = cqe.flags();
            let more = cqueue::more(flags);
            match token.op() {
                Some(Op::Recv) => {
                    let buffer = cqueue::buffer_select(flags);
                    let stamped = self.stamped.is_some();
                    let mut arrived = None;
                    let received = match (cqe.result(), buffer) {
                        (n, Some(bid)) if n > 0 => match self.buffers.filled(bid, n as usize) {
                            Some(data) if stamped => match stamp::split_recvmsg(data) {
                                Some(([], _)) => Received::Eof,
                                Some((payload, at)) => {
                                    arrived = at;
                                    Received::Data(payload)
                                }
                                None => Received::Error(io::Error::other("a short RECVMSG buffer")),
                            },
                            Some(data) => Received::Data(data),
                            None => Received::Error(io::Error::other("the kernel named an unknown buffer")),
                        },
                        (0, _) => Received::Eof,
                        (n, _) if n == -libc::ENOBUFS => {
                            self.counters.buffer_ring_empty += 1;
                            Received::Stopped
                        }
                        (n, _) if n == -libc::ECANCELED => Received::Stopped,
                        (n, _) if n == -libc::ECONNRESET => Received::Eof,
                        (n, _) => Received::Error(io::Error::from_raw_os_error(-n)),
                    };
                    handle(Event::Recv { token, received, more, arrived });
                    if let Some(bid) = buffer {
                        self.buffers.put_back(bid);
                    }
                }
                Some(Op::Send) => handle(Event::Sent { token, result: result_of(cqe) }),
                Some(Op::Connect) => handle(Event::Connected { token, result: result_of(cqe).map(drop) }),
                Some(Op::Accept) => {
                    let result = result_of(cqe).map(|fd| fd as RawFd);
                    handle(Event::Accepted { listener: token.slot() as usize, result, more });
                }
                Some(Op::Wake) => {
                    self.wake_armed = false;
                    handle(Event::Woken);
                }
                Some(Op::Cancel) | None => {}
            }
        }
        self.buffers.publish();
        reaped.clear();
        self.reaped = reaped;
        Ok(())
    }

    fn stamp_receives(&mut self) {
        self.stamped.get_or_insert_with(|| Box::new(stamp::recvmsg_header()));
    }

    fn coalesce_waits(&mut self, window: Duration) -> bool {
        if !self.ring.params().is_feature_min_timeout() {
            return false;
        }
        self.coalesce_wait_us = window.as_micros().min(u128::from(u32::MAX)) as u32;
        true
    }

    fn rearm_budget(&self) -> usize {
        usize::from(self.buffers.count() / 2).max(1)
    }

    fn counters(&self) -> BackendCounters {
        self.counters
    }
}
