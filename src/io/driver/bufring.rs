//! The worker's buffer pool: a provided-buffer ring the kernel picks receive buffers from.
//!
//! One ring of `count` buffers of `size` bytes per worker, shared by all its connections. A
//! multishot receive names the ring's group instead of a buffer; when data arrives the kernel takes
//! the next buffer, fills it, and says which in the completion. The worker processes the bytes in
//! place (handshake parsing, unmasking), copies out only an unfinished tail, and gives the buffer
//! straight back. An idle connection therefore holds no receive buffer at all; memory for receiving
//! is `count * size` per worker, whatever the number of connections.
//!
//! The memory is mapped populated at start, so that its pages are resident from the first moment
//! and a later RSS reading does not mistake the pool's first use for growth per connection.
//!
//! Must never: give the kernel a buffer that is still being read (a buffer goes back only after its
//! handler returned), or publish an entry before it is written (the tail is stored with release
//! ordering after the entries).

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

/// `struct io_uring_buf` of the kernel's ABI: one entry of the ring.
#[repr(C)]
struct RingEntry {
    addr: u64,
    len: u32,
    bid: u16,
    /// In entry 0, this field is the ring's tail (`struct io_uring_buf_ring`).
    resv: u16,
}

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly what mmap returned and nothing uses them after this.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A provided-buffer ring and its buffers. Registered with a ring by its owner (the ring must be
/// closed, or the group unregistered, before this is dropped).
pub struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    size: u32,
    /// Our tail: entries up to here are written; the kernel sees them once published.
    tail: u16,
}

impl BufRing {
    /// A ring of `count` buffers (a power of two, at most 32,768) of `size` bytes each, all of them
    /// in the ring.
    pub fn new(count: u16, size: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer count must be a power of two"));
        }
        let entries = Mapping::new(usize::from(count) * std::mem::size_of::<RingEntry>())?;
        let buffers = Mapping::new(usize::from(count) * size as usize)?;
        let mut ring = BufRing { entries, buffers, count, size, tail: 0 };
        for bid in 0..count {
            ring.put_back(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// The address to register (`IORING_REGISTER_PBUF_RING`).
    pub fn ring_addr(&self) -> u64 {
        self.entries.ptr as u64
    }

    /// Entries in the ring.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Bytes of the pool (buffers plus ring entries).
    pub fn footprint(&self) -> usize {
        self.entries.len + self.buffers.len
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled and handed to us.
    ///
    /// The caller must not hold two views of one buffer, and must not ask for a buffer that is in
    /// the ring (it may be filled meanwhile): only the buffer a completion just named.
    pub fn filled(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        if bid >= self.count || len > self.size as usize {
            return None;
        }
        // SAFETY: `bid < count`, so the buffer lies within the mapping; `len <= size`; the kernel
        // handed this buffer over in a completion and does not touch it until `put_back`; `&mut
        // self` keeps a second view from being made while this one lives.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.buffers.ptr.add(usize::from(bid) * self.size as usize), len)
        })
    }

    /// Gives buffer `bid` back to the kernel (visible after [`BufRing::publish`]).
    pub fn put_back(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        let index = usize::from(self.tail & (self.count - 1));
        let addr = self.buffers.ptr as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: `index < count`, within the entries mapping. The entry at the tail is not one the
        // kernel may read: the kernel reads only entries before the published tail, and at most
        // `count` buffers exist, so the slot at our tail was consumed already.
        unsafe {
            let entry = self.entries.ptr.cast::<RingEntry>().add(index);
            (*entry).addr = addr;
            (*entry).len = self.size;
            (*entry).bid = bid;
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every buffer put back so far available to the kernel.
    pub fn publish(&mut self) {
        // SAFETY: the tail is the u16 at byte 14 of the ring (the `resv` of entry 0), aligned to 2;
        // the kernel reads it atomically.
        let tail = unsafe { &*self.entries.ptr.add(14).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::BufRing;

    #[test]
    fn every_buffer_starts_in_the_ring_at_its_own_address() {
        let ring = BufRing::new(8, 4096).expect("map");
        assert_eq!(ring.tail, 8);
        let entries = ring.entries.ptr.cast::<super::RingEntry>();
        for i in 0..8u16 {
            // SAFETY: 8 entries were mapped.
            let entry = unsafe { &*entries.add(usize::from(i)) };
            assert_eq!(entry.bid, i);
            assert_eq!(entry.len, 4096);
            assert_eq!(entry.addr, ring.buffers.ptr as u64 + u64::from(i) * 4096);
        }
    }

    #[test]
    fn a_view_is_bounded_by_the_buffer() {
        let mut ring = BufRing::new(4, 256).expect("map");
        assert!(ring.filled(4, 1).is_none(), "no such buffer");
        assert!(ring.filled(0, 257).is_none(), "longer than a buffer");
        assert_eq!(ring.filled(3, 256).map(|b| b.len()), Some(256));
        assert!(BufRing::new(3, 256).is_err(), "not a power of two");
    }
}
