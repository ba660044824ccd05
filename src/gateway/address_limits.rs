//! Per-address limits on connections: how many one address may hold open (`--max-conns-per-ip`)
//! and how many it may open each second (`--max-conn-rate-per-ip`).
//!
//! The table is process-wide: `SO_REUSEPORT` spreads one address's connections over every worker
//! (it hashes the whole 4-tuple), so a per-worker count would let an address hold `workers` times
//! its cap. One mutex guards it, taken once when a connection is accepted and once when a counted
//! one closes, and only while a per-address limit is configured (otherwise no table exists and
//! no address is looked up).
//!
//! An address is an IPv4 address or an IPv6 /64 prefix: one IPv6 host is commonly given a whole
//! /64, so counting single IPv6 addresses would let it open 2^64 times its cap. IPv4-mapped IPv6
//! addresses count as their IPv4 address.
//!
//! Memory is bounded: an address is in the table while it holds a counted connection (at most
//! `--max-conns` of them) or while its new-connection bucket is refilling (at most one second
//! after its last attempt); the others are swept away whenever the table has doubled since the
//! last sweep. A connection remembers its address as a 4-byte ticket (a slot in the table), not
//! as the 16-byte address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Instant;

/// Addresses the table holds before its first sweep.
const SWEEP_FLOOR: usize = 1024;

/// The configured per-address limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressLimitSettings {
    /// Connections one address may hold open at once; 0: unlimited.
    pub max_conns_per_ip: u32,
    /// Connections one address may open per second (a bucket of one second's worth); 0: unlimited.
    pub max_conn_rate_per_ip: u32,
}

impl AddressLimitSettings {
    /// Whether any per-address limit is configured.
    pub fn is_enabled(&self) -> bool {
        self.max_conns_per_ip > 0 || self.max_conn_rate_per_ip > 0
    }
}

/// Why a connection was refused for its address: the `reason` of
/// `ringgate_address_refusals_total`. Each is answered 429 with `Retry-After: 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressRefusal {
    /// The address already holds `--max-conns-per-ip` connections.
    TooManyConnections,
    /// The address opened `--max-conn-rate-per-ip` connections within the last second.
    TooManyNewConnections,
}

impl AddressRefusal {
    /// Every reason, in table order.
    pub const ALL: [AddressRefusal; 2] =
        [AddressRefusal::TooManyConnections, AddressRefusal::TooManyNewConnections];

    /// A stable label for `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            AddressRefusal::TooManyConnections => "conns_per_ip",
            AddressRefusal::TooManyNewConnections => "conn_rate_per_ip",
        }
    }

    /// This reason's slot in a counter table.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A counted connection's claim on its address's slot, given back with [`AddressLimits::release`]
/// when the connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressTicket(NonZeroU32);

/// What limits are counted per: an IPv4 address or an IPv6 /64 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum AddressKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl AddressKey {
    fn of(ip: IpAddr) -> AddressKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let octets = v6.octets();
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&octets[..8]);
                AddressKey::V6Prefix(prefix)
            }
        }
    }
}

/// One address's counts.
#[derive(Debug)]
struct Slot {
    key: AddressKey,
    /// Counted connections open (only counted while `--max-conns-per-ip` is set).
    open: u32,
    /// New connections it may still open now (its bucket).
    tokens: f32,
    /// When `tokens` was last brought up to date (milliseconds since the table was made).
    refilled_ms: u64,
}

#[derive(Debug, Default)]
struct Table {
    index: HashMap<AddressKey, u32>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Size at which the next sweep runs.
    sweep_at: usize,
}

/// The process-wide per-address counts.
#[derive(Debug)]
pub struct AddressLimits {
    settings: AddressLimitSettings,
    epoch: Instant,
    table: Mutex<Table>,
}

impl AddressLimits {
    /// A table for `settings`, or none when no per-address limit is configured.
    pub fn new(settings: AddressLimitSettings) -> Option<AddressLimits> {
        settings.is_enabled().then(|| AddressLimits {
            settings,
            epoch: Instant::now(),
            table: Mutex::new(Table { sweep_at: SWEEP_FLOOR, ..Table::default() }),
        })
    }

    /// Milliseconds since the table was made: the clock every worker shares for the buckets.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A connection from `ip` was accepted at `now_ms`: admits it (with a ticket to give back on
    /// close when connections are counted) or says why it is refused. A refused attempt spends
    /// nothing, so a client retrying after its `Retry-After` is not refused for its refusals.
    pub fn admit(&self, ip: IpAddr, now_ms: u64) -> Result<Option<AddressTicket>, AddressRefusal> {
        let AddressLimitSettings { max_conns_per_ip, max_conn_rate_per_ip } = self.settings;
        let mut table = self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if table.index.len() >= table.sweep_at {
            self.sweep(&mut table, now_ms);
        }
        let key = AddressKey::of(ip);
        let position = match table.index.get(&key) {
            Some(&position) => position,
            None => {
                let slot = Slot { key, open: 0, tokens: max_conn_rate_per_ip as f32, refilled_ms: now_ms };
                let position = match table.free.pop() {
                    Some(position) => {
                        table.slots[position as usize] = Some(slot);
                        position
                    }
                    None => {
                        table.slots.push(Some(slot));
                        (table.slots.len() - 1) as u32
                    }
                };
                table.index.insert(key, position);
                position
            }
        };
        let Some(slot) = table.slots[position as usize].as_mut() else {
            return Ok(None); // the index names only filled slots
        };
        if max_conn_rate_per_ip > 0 {
            self.refill(slot, now_ms);
            if slot.tokens < 1.0 {
                return Err(AddressRefusal::TooManyNewConnections);
            }
        }
        if max_conns_per_ip > 0 && slot.open >= max_conns_per_ip {
            return Err(AddressRefusal::TooManyConnections);
        }
        if max_conn_rate_per_ip > 0 {
            slot.tokens -= 1.0;
        }
        if max_conns_per_ip == 0 {
            return Ok(None);
        }
        slot.open += 1;
        Ok(NonZeroU32::new(position + 1).map(AddressTicket))
    }

    /// A counted connection closed: its address may open another.
    pub fn release(&self, ticket: AddressTicket, now_ms: u64) {
        let position = ticket.0.get() - 1;
        let mut table = self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(slot) = table.slots.get_mut(position as usize).and_then(Option::as_mut) else {
            return;
        };
        slot.open = slot.open.saturating_sub(1);
        if slot.open == 0 && self.is_idle(slot, now_ms) {
            let key = slot.key;
            table.slots[position as usize] = None;
            table.index.remove(&key);
            table.free.push(position);
        }
    }

    /// Addresses the table holds now (each costs about 60 bytes): for `/metrics`.
    pub fn tracked_addresses(&self) -> usize {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).index.len()
    }

    fn refill(&self, slot: &mut Slot, now_ms: u64) {
        let rate = self.settings.max_conn_rate_per_ip as f32;
        let elapsed = now_ms.saturating_sub(slot.refilled_ms) as f32 / 1000.0;
        slot.tokens = (slot.tokens + rate * elapsed).min(rate);
        slot.refilled_ms = slot.refilled_ms.max(now_ms);
    }

    /// Whether forgetting `slot` changes nothing: no counted connection, a full bucket.
    fn is_idle(&self, slot: &mut Slot, now_ms: u64) -> bool {
        if slot.open > 0 {
            return false;
        }
        if self.settings.max_conn_rate_per_ip == 0 {
            return true;
        }
        self.refill(slot, now_ms);
        slot.tokens >= self.settings.max_conn_rate_per_ip as f32
    }

    fn sweep(&self, table: &mut Table, now_ms: u64) {
        let Table { index, slots, free, sweep_at } = table;
        for (position, entry) in slots.iter_mut().enumerate() {
            if let Some(slot) = entry.as_mut()
                && self.is_idle(slot, now_ms)
            {
                index.remove(&slot.key);
                *entry = None;
                free.push(position as u32);
            }
        }
        *sweep_at = (index.len() * 2).max(SWEEP_FLOOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_conns_per_ip: u32, max_conn_rate_per_ip: u32) -> AddressLimits {
        AddressLimits::new(AddressLimitSettings { max_conns_per_ip, max_conn_rate_per_ip })
            .expect("a limit is set")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn no_limit_makes_no_table() {
        assert!(AddressLimits::new(AddressLimitSettings::default()).is_none());
    }

    #[test]
    fn the_cap_admits_exactly_its_count_and_frees_slots_on_release() {
        let table = limits(3, 0);
        let a = ip("10.0.0.1");
        let tickets: Vec<_> = (0..3).map(|_| table.admit(a, 0).expect("under the cap")).collect();
        assert_eq!(table.admit(a, 0), Err(AddressRefusal::TooManyConnections));
        assert!(table.admit(ip("10.0.0.2"), 0).is_ok(), "another address has its own cap");
        table.release(tickets[0].expect("counted"), 0);
        let again = table.admit(a, 0).expect("a slot was freed");
        assert_eq!(table.admit(a, 0), Err(AddressRefusal::TooManyConnections));
        for ticket in tickets.into_iter().skip(1).chain([again]) {
            table.release(ticket.expect("counted"), 0);
        }
        assert_eq!(table.tracked_addresses(), 1, "only 10.0.0.2 still holds a connection");
    }

    #[test]
    fn the_new_connection_rate_admits_a_second_of_them_then_refills() {
        let table = limits(0, 10);
        let a = ip("192.0.2.7");
        for _ in 0..10 {
            assert_eq!(table.admit(a, 5_000), Ok(None), "uncounted: no ticket");
        }
        assert_eq!(table.admit(a, 5_000), Err(AddressRefusal::TooManyNewConnections));
        assert_eq!(table.admit(a, 5_099), Err(AddressRefusal::TooManyNewConnections));
        assert_eq!(table.admit(a, 5_100), Ok(None), "a tenth of a second refills one");
        assert_eq!(table.admit(a, 5_100), Err(AddressRefusal::TooManyNewConnections));
        // At the rate (one per 100 ms) it never trips.
        for step in 1..=100 {
            assert_eq!(table.admit(a, 5_100 + step * 100), Ok(None));
        }
    }

    #[test]
    fn ipv6_counts_per_64_prefix_and_mapped_ipv4_as_ipv4() {
        let table = limits(1, 0);
        assert!(table.admit(ip("2001:db8:1:2::1"), 0).is_ok());
        assert_eq!(table.admit(ip("2001:db8:1:2::ffff"), 0), Err(AddressRefusal::TooManyConnections));
        assert!(table.admit(ip("2001:db8:1:3::1"), 0).is_ok(), "another /64");
        assert!(table.admit(ip("198.51.100.1"), 0).is_ok());
        assert_eq!(table.admit(ip("::ffff:198.51.100.1"), 0), Err(AddressRefusal::TooManyConnections));
    }

    #[test]
    fn refusals_spend_nothing() {
        let table = limits(1, 2);
        let a = ip("10.1.1.1");
        let ticket = table.admit(a, 0).expect("first").expect("counted");
        for _ in 0..100 {
            assert_eq!(table.admit(a, 0), Err(AddressRefusal::TooManyConnections));
        }
        table.release(ticket, 0);
        assert!(table.admit(a, 0).is_ok(), "its second token is still there");
    }

    #[test]
    fn the_table_forgets_idle_addresses_and_stays_bounded() {
        let table = limits(0, 5);
        for n in 0..10_000u32 {
            let [_, b, c, d] = n.to_be_bytes();
            let address = IpAddr::from([10, b, c, d]);
            // One attempt each, a millisecond apart: each bucket is full again after 200 ms.
            assert!(table.admit(address, u64::from(n)).is_ok());
        }
        let tracked = table.tracked_addresses();
        assert!(tracked <= 2 * SWEEP_FLOOR, "{tracked} addresses tracked");
    }

    #[test]
    fn released_slots_are_reused() {
        let table = limits(1, 0);
        for n in 0..100u8 {
            let ticket = table.admit(IpAddr::from([10, 0, 0, n]), 0).expect("admitted").expect("counted");
            table.release(ticket, 0);
        }
        let guard = table.table.lock().expect("not poisoned");
        assert_eq!(guard.slots.len(), 1, "one slot served them all in turn");
        assert!(guard.index.is_empty());
    }
}
