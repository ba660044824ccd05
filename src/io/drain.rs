//! A worker's "draining has started" signal. Every waiting connection must hear it.
//!
//! Why not `tokio::sync::Notify`: a connection waits for the signal in every turn of its loop. A
//! `Notified` future that is created, polled and dropped on each turn takes the `Notify`'s mutex
//! twice per message, which cost about 1.7% of the worker's CPU at 1,000 echo connections. Here a
//! connection owns a slot holding its task's waker. The slot is refreshed only when that waker
//! changes, with no lock and no allocation. The worker is one thread, so a `RefCell` is enough.
//!
//! Must never: miss a waiter (every filled slot is woken when draining starts), or keep a slot after
//! its owner has gone (owners give it back with [`DrainSignal::release`]).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A connection's place in the signal's waiter list, or none yet.
#[derive(Default)]
pub struct DrainSlot(Cell<Option<u32>>);

/// Wakes every registered waiter of one worker once, when draining starts.
#[derive(Default)]
pub struct DrainSignal {
    started: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<u32>>,
}

impl DrainSignal {
    /// Completes once draining has started. Registers `slot`'s owner on first poll and keeps its
    /// waker current; the wait can be dropped and made again freely, as a connection does on each
    /// turn of its loop.
    pub fn wait<'a>(&'a self, slot: &'a DrainSlot) -> DrainWait<'a> {
        DrainWait { signal: self, slot }
    }

    /// Starts draining: wakes every waiter, now and for good (later waits complete at once).
    pub fn start(&self) {
        self.started.set(true);
        let wakers: Vec<Waker> = self.waiters.borrow_mut().iter_mut().filter_map(Option::take).collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Gives `slot`'s place back; call when its owner ends.
    pub fn release(&self, slot: &DrainSlot) {
        if let Some(index) = slot.0.take() {
            if let Some(waker) = self.waiters.borrow_mut().get_mut(index as usize) {
                *waker = None;
            }
            self.free.borrow_mut().push(index);
        }
    }

    fn register(&self, slot: &DrainSlot, waker: &Waker) {
        let mut waiters = self.waiters.borrow_mut();
        let index = match slot.0.get() {
            Some(index) => index,
            None => {
                let index = self.free.borrow_mut().pop().unwrap_or_else(|| {
                    waiters.push(None);
                    (waiters.len() - 1) as u32
                });
                slot.0.set(Some(index));
                index
            }
        };
        let stored = &mut waiters[index as usize];
        if !stored.as_ref().is_some_and(|current| current.will_wake(waker)) {
            *stored = Some(waker.clone());
        }
    }
}

/// See [`DrainSignal::wait`].
pub struct DrainWait<'a> {
    signal: &'a DrainSignal,
    slot: &'a DrainSlot,
}

impl Future for DrainWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.started.get() {
            return Poll::Ready(());
        }
        self.signal.register(self.slot, cx.waker());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    use super::{DrainSignal, DrainSlot};

    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_registered_waiter_is_woken_once_and_released_slots_are_reused() {
        let signal = DrainSignal::default();
        let counters: Vec<Arc<Counter>> = (0..3).map(|_| Arc::new(Counter(AtomicUsize::new(0)))).collect();
        let slots: Vec<DrainSlot> = (0..3).map(|_| DrainSlot::default()).collect();
        for (counter, slot) in counters.iter().zip(&slots) {
            let waker = Waker::from(Arc::clone(counter));
            // Polled twice, as a connection does on consecutive turns: still one slot.
            for _ in 0..2 {
                let wait = pin!(signal.wait(slot));
                assert_eq!(wait.poll(&mut Context::from_waker(&waker)), Poll::Pending);
            }
        }
        assert_eq!(signal.waiters.borrow().len(), 3);
        signal.release(&slots[1]);
        let reused = DrainSlot::default();
        let waker = Waker::from(Arc::clone(&counters[1]));
        assert_eq!(pin!(signal.wait(&reused)).poll(&mut Context::from_waker(&waker)), Poll::Pending);
        assert_eq!(signal.waiters.borrow().len(), 3, "the released slot is taken again");

        signal.start();
        let woken: Vec<usize> = counters.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        assert_eq!(woken, [1, 1, 1]);
        assert_eq!(pin!(signal.wait(&slots[0])).poll(&mut Context::from_waker(&waker)), Poll::Ready(()));
    }
}
