//! One thread's send pacer: every connection's "wake me at time t" goes into one min-heap, and a
//! single driver task sleeps (one io_uring absolute timeout) until the earliest due time, then
//! wakes every connection that is due.
//!
//! Why not one timeout op per message: each armed hrtimer costs a timer reprogramming, which in a
//! virtual machine is a VM exit; measured on this machine kind, per-message timeouts cost ~3x the
//! CPU of the whole echo. Why not tokio's timer: its 1 ms resolution would make every message up
//! to a millisecond late and charge that to the server. The pacer wakes within microseconds and
//! coalesces wakeups that fall in the same `--timer-slack` window.
//!
//! Must never: wake a connection before its due time (an early send would understate latency), or
//! lose a registration (a due connection is always woken, even if a later one was registered
//! first).

use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use super::timer;
use crate::clock;

struct Entry {
    due: u64,
    order: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

/// The per-thread pacer. Share it with `Rc`; run [`Pacer::drive`] as a task.
pub struct Pacer {
    /// Due times are rounded up to a multiple of this (ns, at least 1), so connections due within
    /// the same window share one wakeup. The lateness this adds shows in the send lag and is
    /// charged to latency, as it must be.
    slack: u64,
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    next_order: Cell<u64>,
    /// The time the driver's timeout is armed for, if it is sleeping on one.
    armed: Cell<Option<u64>>,
    /// Wakes the driver: a registration earlier than `armed`, or the first one into an empty heap.
    kick: Notify,
    stopped: Cell<bool>,
}

impl Pacer {
    /// A pacer that coalesces wakeups within `slack` nanoseconds.
    pub fn new(slack: u64) -> Pacer {
        Pacer {
            slack: slack.max(1),
            heap: RefCell::new(BinaryHeap::new()),
            next_order: Cell::new(0),
            armed: Cell::new(None),
            kick: Notify::new(),
            stopped: Cell::new(false),
        }
    }

    /// A future that completes at or after `due` (run clock), never before.
    pub fn sleep_until(self: &Rc<Self>, due: u64) -> PacedSleep {
        PacedSleep { pacer: Rc::clone(self), due: due.div_ceil(self.slack) * self.slack, registered: false }
    }

    fn register(&self, due: u64, waker: Waker) {
        let order = self.next_order.get();
        self.next_order.set(order + 1);
        self.heap.borrow_mut().push(Reverse(Entry { due, order, waker }));
        if self.armed.get().is_none_or(|armed| due < armed) {
            self.kick.notify_one();
        }
    }

    /// Ends [`Pacer::drive`]; call once no connection is left.
    pub fn stop(&self) {
        self.stopped.set(true);
        self.kick.notify_one();
    }

    /// The driver: sleeps until the earliest due time and wakes everything due. Runs until
    /// [`Pacer::stop`].
    pub async fn drive(self: Rc<Self>) {
        loop {
            let now = clock::now();
            let earliest = {
                let mut heap = self.heap.borrow_mut();
                while heap.peek().is_some_and(|entry| entry.0.due <= now) {
                    if let Some(Reverse(entry)) = heap.pop() {
                        entry.waker.wake();
                    }
                }
                heap.peek().map(|entry| entry.0.due)
            };
            match earliest {
                // Every connection has ended; entries left behind belong to sleeps that were
                // dropped (a connection that failed mid-wait) and need no wakeup.
                _ if self.stopped.get() => return,
                None => {
                    self.armed.set(None);
                    self.kick.notified().await;
                }
                Some(due) => {
                    self.armed.set(Some(due));
                    let mut sleep = pin!(timer::sleep_until(due));
                    tokio::select! {
                        biased;
                        () = &mut sleep => {}
                        // An earlier registration: re-arm. The superseded timeout stays in the
                        // ring until it fires, which is harmless.
                        () = self.kick.notified() => {}
                    }
                    self.armed.set(None);
                }
            }
        }
    }
}

/// See [`Pacer::sleep_until`].
pub struct PacedSleep {
    pacer: Rc<Pacer>,
    due: u64,
    registered: bool,
}

impl Future for PacedSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if clock::now() >= this.due {
            return Poll::Ready(());
        }
        if !this.registered {
            this.registered = true;
            this.pacer.register(this.due, cx.waker().clone());
        }
        Poll::Pending
    }
}
