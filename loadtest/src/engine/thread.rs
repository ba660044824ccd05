//! One client thread's loop: its connections in a table indexed by slot, its pacing wheel, and
//! one io backend (ringgate's own io_uring driver, or its epoll backend).
//!
//! Each turn: start the connections the ramp-up says are due, fire the timers that came due,
//! sync every connection something happened to (which queues its sends and receives), then one
//! wait on the backend that submits all of it and sleeps until the next event or the next timer.
//! Every connection due in one tick thus sends in one submission, and a turn with nothing due
//! costs one system call.
//!
//! Must never: sleep past a due timer or the end of a phase, let a connection's slot name another
//! connection (slots are not reused within a run), or block (every wait is bounded, so an
//! interruption is seen within [`INTERRUPT_POLL`]).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use ringgate::io::{Backend, Event, Op, Side, Token};
use rustls::ClientConfig;
use socket2::SockAddr;

use super::conn::Conn;
use super::env::Env;
use super::pubsub;
use super::wheel::Wheel;
use super::wire::Compressors;
use super::{Report, SNAPSHOT_INTERVAL};
use crate::cli::Plan;
use crate::schedule::Phases;
use crate::stats::{PairCounts, ThreadLoad, ThreadStats};
use crate::{clock, cpu, interrupt};

/// The longest a thread sleeps without looking for an interruption.
pub const INTERRUPT_POLL: Duration = Duration::from_millis(100);

/// How long connections get after an interruption to take their outstanding echoes and close.
const INTERRUPT_DRAIN: Duration = Duration::from_secs(1);

/// An [`Env`] borrowing the thread's fields (disjointly from its connection table).
macro_rules! thread_env {
    ($thread:ident, $now:expr) => {
        Env {
            plan: &$thread.plan,
            phases: &$thread.phases,
            stats: &mut $thread.stats,
            pubsub: $thread.pubsub.as_deref(),
            scratch: &mut $thread.scratch,
            compressors: &mut $thread.compressors,
            tls: $thread.tls.as_ref(),
            plaintext: &mut $thread.plaintext,
            now: $now,
        }
    };
}

/// One client thread.
pub struct ClientThread {
    index: usize,
    plan: Arc<Plan>,
    phases: Phases,
    pubsub: Option<Arc<pubsub::Shared>>,
    /// The targets (one per node), where connects read them from until they complete.
    addrs: Box<[SockAddr]>,
    conns: Vec<Conn>,
    /// Connections started so far (slots below this have a socket or are done).
    started: usize,
    /// Connections not done.
    live: usize,
    wheel: Wheel,
    fired: Vec<u32>,
    touched: Vec<u32>,
    stats: ThreadStats,
    scratch: Vec<u8>,
    compressors: Compressors,
    /// `wss://`: the configuration the connections' TLS sessions share.
    tls: Option<Arc<ClientConfig>>,
    /// `wss://`: where one read's plaintext is gathered (see [`Env::plaintext`]).
    plaintext: Vec<u8>,
    next_snapshot: u64,
    /// Thread CPU and run-clock time when the measured window began.
    load_from: Option<(u64, u64)>,
    load_done: bool,
    interrupted: bool,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC this turn, for the kernel's receive stamps.
    realtime_offset: i64,
    /// The longest a thread with nothing due sleeps while completions gather (0: wake for each).
    coalesce: u64,
}

impl ClientThread {
    /// Thread `index` of the run, with its share of the connections (dealt round-robin).
    pub fn new(
        index: usize,
        plan: Arc<Plan>,
        phases: Phases,
        pubsub: Option<Arc<pubsub::Shared>>,
        tls: Option<Arc<ClientConfig>>,
    ) -> ClientThread {
        let max_message = plan.size.max(4096);
        let conns: Vec<Conn> = (index as u32..plan.conns)
            .step_by(plan.threads)
            .map(|conn| Conn::new(conn, pubsub.as_ref().map(|shared| shared.role(conn)), max_message))
            .collect();
        let slack = plan.timer_slack.as_nanos() as u64;
        let mut stats = ThreadStats::default();
        if let Some(shared) = &pubsub {
            let nodes = shared.nodes() as usize;
            stats.node_pairs = vec![PairCounts::default(); nodes * nodes];
        }
        ClientThread {
            index,
            addrs: plan.targets.iter().map(|target| SockAddr::from(target.addr)).collect(),
            live: conns.len(),
            conns,
            started: 0,
            wheel: Wheel::new(slack, clock::now()),
            fired: Vec::new(),
            touched: Vec::new(),
            stats,
            scratch: vec![0; plan.size],
            compressors: Compressors::default(),
            tls,
            plaintext: Vec::new(),
            next_snapshot: phases.begin + SNAPSHOT_INTERVAL.as_nanos() as u64,
            load_from: None,
            load_done: false,
            interrupted: false,
            realtime_offset: clock::realtime_offset(),
            coalesce: plan.coalesce_wait.as_nanos() as u64,
            plan,
            phases,
            pubsub,
        }
    }

    /// Runs every connection of the thread to its end; returns the thread's statistics.
    pub fn run<B: Backend>(
        mut self,
        backend: &mut B,
        reports: &Sender<Report>,
    ) -> std::io::Result<ThreadStats> {
        backend.stamp_receives();
        if self.coalesce > 0 {
            // Where the backend cannot (epoll, kernels before 6.12), every completion wakes the
            // thread, as without coalescing; the stamps keep latency exact either way.
            backend.coalesce_waits(Duration::from_nanos(self.coalesce));
        }
        loop {
            let now = clock::now();
            self.realtime_offset = clock::realtime_offset();
            self.check_interrupt(now);
            self.track_load(now);
            self.start_due(backend, now);
            self.fire_timers(now);
            self.sync_touched(backend);
            if now >= self.next_snapshot {
                self.next_snapshot += SNAPSHOT_INTERVAL.as_nanos() as u64;
                let _ = reports.send(Report::Snapshot(self.index, self.stats.snapshot()));
            }
            if self.live == 0 && self.started == self.conns.len() {
                break;
            }
            let now = clock::now();
            let timeout = Duration::from_nanos(self.next_wake().saturating_sub(now)).min(INTERRUPT_POLL);
            backend.wait(Some(timeout), &mut |event| self.on_event(event))?;
        }
        self.finish_load(clock::now());
        Ok(self.stats)
    }

    /// The earliest time the loop must wake for: a timer, the next connection to start, the
    /// next snapshot, the measured window's edges.
    fn next_wake(&self) -> u64 {
        let mut next = self.next_snapshot;
        if let Some(at) = self.wheel.next_due() {
            next = next.min(at);
        }
        if let Some(conn) = self.conns.get(self.started) {
            next = next.min(self.phases.connect_at(conn.index, self.plan.connect_rate));
        }
        if self.load_from.is_none() && !self.load_done {
            next = next.min(self.phases.measure_start);
        } else if !self.load_done {
            next = next.min(self.phases.end);
        }
        next
    }

    fn on_event(&mut self, event: Event<'_>) {
        let token = match &event {
            Event::Recv { token, .. } | Event::Sent { token, .. } | Event::Connected { token, .. } => *token,
            Event::Accepted { .. } | Event::Woken => return,
        };
        let slot = token.slot();
        let Some(conn) = self.conns.get_mut(slot as usize) else { return };
        let mut env = thread_env!(self, clock::now());
        match event {
            Event::Recv { received, more, arrived, .. } => {
                if let Some(at) = arrived {
                    env.now = clock::from_realtime(at, self.realtime_offset, env.now);
                }
                conn.on_recv(&mut env, received, more);
            }
            Event::Sent { result, .. } => conn.on_sent(&mut env, result),
            Event::Connected { result, .. } => conn.on_connected(&mut env, result),
            Event::Accepted { .. } | Event::Woken => {}
        }
        touch(&mut self.touched, conn, slot);
    }

    /// Starts every connection whose time on the ramp has come.
    fn start_due<B: Backend>(&mut self, backend: &mut B, now: u64) {
        while self.started < self.conns.len() {
            let slot = self.started;
            let index = self.conns[slot].index;
            if self.phases.connect_at(index, self.plan.connect_rate) > now {
                return;
            }
            self.started += 1;
            let source = match self.plan.source_ips.len() {
                0 => None::<Ipv4Addr>,
                n => Some(self.plan.source_ips[index as usize % n]),
            };
            let token = token(slot as u32);
            let addr: &SockAddr = &self.addrs[self.plan.node_of(index)];
            let mut env = thread_env!(self, now);
            let conn = &mut self.conns[slot];
            conn.start(&mut env, backend, token, addr, source);
            touch(&mut self.touched, conn, slot as u32);
        }
    }

    fn fire_timers(&mut self, now: u64) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(now, &mut fired);
        for &slot in &fired {
            let mut env = thread_env!(self, now);
            let conn = &mut self.conns[slot as usize];
            if conn.wake_at.is_some_and(|at| at <= now) {
                conn.wake_at = None;
            }
            conn.on_timer(&mut env);
            touch(&mut self.touched, conn, slot);
        }
        fired.clear();
        self.fired = fired;
    }

    /// Syncs every connection touched since the last sync, and schedules its timer.
    fn sync_touched<B: Backend>(&mut self, backend: &mut B) {
        let now = clock::now();
        let mut touched = std::mem::take(&mut self.touched);
        for &slot in &touched {
            let mut env = thread_env!(self, now);
            let conn = &mut self.conns[slot as usize];
            conn.touched = false;
            let was_done = conn.is_done();
            let wake = conn.sync(&mut env, backend, token(slot));
            if conn.is_done() {
                if !was_done {
                    self.live -= 1;
                }
                continue;
            }
            // One entry per connection at a time, unless it needs an earlier one: comparing fire
            // times (rounded to the tick), a due time unchanged since the last turn adds nothing.
            if let Some(at) = wake
                && conn.wake_at.is_none_or(|pending| self.wheel.fire_time(at) < pending)
            {
                conn.wake_at = Some(self.wheel.insert(at, slot));
            }
        }
        touched.clear();
        self.touched = touched;
    }

    /// On an interruption: the run ends now for this thread. Sending stops, what is in flight
    /// gets [`INTERRUPT_DRAIN`], connections not yet established give up, and none start.
    fn check_interrupt(&mut self, now: u64) {
        if self.interrupted {
            return;
        }
        let Some(at) = interrupt::requested() else { return };
        self.interrupted = true;
        let phases = &mut self.phases;
        phases.end = phases.end.min(at.max(phases.begin));
        phases.measure_start = phases.measure_start.min(phases.end);
        phases.ramp_end = phases.ramp_end.min(phases.end);
        phases.drain_end = phases.drain_end.min(now + INTERRUPT_DRAIN.as_nanos() as u64).max(phases.end);
        // Connections never started are not attempted.
        let skipped = self.conns.len() - self.started;
        if let Some(shared) = self.pubsub.as_deref() {
            for conn in &self.conns[self.started..] {
                shared.connected(shared.role(conn.index), false);
            }
        }
        self.live -= skipped;
        self.started = self.conns.len();
        let mut env = thread_env!(self, now);
        for (slot, conn) in self.conns.iter_mut().enumerate() {
            if conn.is_done() {
                continue;
            }
            conn.interrupt(&mut env);
            touch(&mut self.touched, conn, slot as u32);
        }
    }

    /// Samples this thread's CPU at the edges of the measured window.
    fn track_load(&mut self, now: u64) {
        if self.load_from.is_none() && !self.load_done && now >= self.phases.measure_start {
            self.load_from = Some((cpu::thread_cpu_ns(), now));
        }
        if now >= self.phases.end {
            self.finish_load(now);
        }
    }

    fn finish_load(&mut self, now: u64) {
        if self.load_done {
            return;
        }
        self.load_done = true;
        if let Some((cpu_from, wall_from)) = self.load_from {
            let wall_ns = now.min(self.phases.end.max(wall_from)) - wall_from;
            if wall_ns > 0 {
                self.stats.loads.push(ThreadLoad { cpu_ns: cpu::thread_cpu_ns() - cpu_from, wall_ns });
            }
        }
    }
}

/// Puts the connection in `slot` on the list of those to sync this turn, once.
fn touch(touched: &mut Vec<u32>, conn: &mut Conn, slot: u32) {
    if !conn.touched {
        conn.touched = true;
        touched.push(slot);
    }
}

/// The token of the connection in `slot`: slots are never reused within a run, so generation 0.
fn token(slot: u32) -> Token {
    Token::new(slot, 0, Side::Client, Op::Recv)
}
