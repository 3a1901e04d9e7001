//! Rate limits and per-source accounting, sans-IO (time is a parameter).
//!
//! - [`TokenBucket`]: bytes (or events) per second with a burst, in integer arithmetic (from
//!   [`ferry_core::ratelimit`]); each bound slot's DATA budget is one.
//! - [`IpTable`]: per source, a bind-rate bucket and the number of slots the source holds. A
//!   source is an IPv4 address, or an IPv6 prefix of [`IpLimits::ipv6_prefix_len`] bits (one
//!   host usually owns a whole /64, and could otherwise take a fresh address for every BIND).
//!   It is a [`KeyedLimiter`], the same bounded table as the gateway's request limits: when it
//!   is full, idle sources make room (a sweep at most once a second); if none is idle the new
//!   source is refused (counted), never an existing entry forgotten while it holds slots.
//! - [`SlotAccounts`]: what a session table charges slots to; [`IpTable`] implements it, and so
//!   does whatever shares one table between session shards.

use std::net::IpAddr;
use std::time::Instant;

use ferry_core::cidr::limit_key;
pub use ferry_core::ratelimit::TokenBucket;
use ferry_core::ratelimit::{KeyState, KeyedLimiter, Refused};

/// Per-source limits, from the config's `[limits]` section.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IpLimits {
    /// BIND/REBIND attempts per second per source (after the address cookie checks out).
    pub bind_rate: f64,
    /// Attempts a source may make at once after a quiet period.
    pub bind_burst: u32,
    /// Slots one source may hold bound at once.
    pub max_bindings: u32,
    /// Sources tracked at once.
    pub capacity: usize,
    /// IPv6 sources are counted per prefix of this length; IPv4 sources per address.
    pub ipv6_prefix_len: u8,
}

impl Default for IpLimits {
    fn default() -> Self {
        Self {
            bind_rate: 20.0,
            bind_burst: 40,
            max_bindings: 64,
            capacity: 1 << 20,
            ipv6_prefix_len: 64,
        }
    }
}

/// Why [`IpTable`] refused a bind attempt or a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpRefusal {
    /// The source is over its bind rate.
    RateLimited,
    /// The source already holds `max_bindings` slots.
    TooManyBindings,
    /// The table is full of sources that hold slots or have recently bound.
    TableFull,
}

/// What the table keeps per source next to its bind-rate bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    bindings: u32,
}

impl KeyState for Held {
    /// A source that holds a slot is never forgotten.
    fn is_idle(&self) -> bool {
        self.bindings == 0
    }
}

/// What a [`crate::session::SessionTable`] charges the slots it binds to. Checking and taking a
/// slot are separate calls, as the table checks before its other checks and takes after them.
pub trait SlotAccounts {
    /// Whether the source of `ip` may take one more slot.
    fn may_attach(&self, ip: IpAddr) -> Result<(), IpRefusal>;
    /// Records that the source of `ip` now holds one more slot.
    fn attach(&mut self, ip: IpAddr, now: Instant);
    /// Records that the source of `ip` gave up one slot.
    fn detach(&mut self, ip: IpAddr);
    /// Moves one slot from the source of `from` to that of `to` (a REBIND), unless `to`'s
    /// source may not take one more; nothing changes when both are the same source.
    fn move_slot(&mut self, from: IpAddr, to: IpAddr, now: Instant) -> Result<(), IpRefusal>;
}

/// Bind rates and binding counts per source, shared by every session shard.
#[derive(Debug)]
pub struct IpTable {
    limits: IpLimits,
    table: KeyedLimiter<IpAddr, Held>,
}

impl IpTable {
    /// An empty table.
    pub fn new(limits: IpLimits) -> Self {
        Self {
            table: KeyedLimiter::new(limits.bind_rate, limits.bind_burst, limits.capacity),
            limits,
        }
    }

    /// The key `ip` is counted under.
    fn key(&self, ip: IpAddr) -> IpAddr {
        limit_key(ip, self.limits.ipv6_prefix_len)
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// How many times the full table has been swept for idle sources.
    pub fn sweeps(&self) -> u64 {
        self.table.sweeps()
    }

    /// Slots the source of `ip` holds now.
    pub fn bindings(&self, ip: IpAddr) -> u32 {
        self.table.state(&self.key(ip)).map_or(0, |h| h.bindings)
    }

    /// New limits (SIGHUP); existing sources keep their state under the new rates. The IPv6
    /// prefix length stays as it was: the binding counts are keyed by it, so a new one takes a
    /// restart (the config's reload check refuses it).
    pub fn set_limits(&mut self, limits: IpLimits) {
        self.table
            .set_limits(limits.bind_rate, limits.bind_burst, limits.capacity);
        self.limits = IpLimits {
            ipv6_prefix_len: self.limits.ipv6_prefix_len,
            ..limits
        };
    }

    /// Charges one bind attempt to the source of `ip`; refuses when over its rate.
    pub fn try_bind_attempt(&mut self, ip: IpAddr, now: Instant) -> Result<(), IpRefusal> {
        self.table.check(&self.key(ip), now).map_err(|e| match e {
            Refused::Empty(_) => IpRefusal::RateLimited,
            Refused::TableFull => IpRefusal::TableFull,
        })
    }
}

impl SlotAccounts for IpTable {
    fn may_attach(&self, ip: IpAddr) -> Result<(), IpRefusal> {
        match self.bindings(ip) < self.limits.max_bindings {
            true => Ok(()),
            false => Err(IpRefusal::TooManyBindings),
        }
    }

    fn attach(&mut self, ip: IpAddr, now: Instant) {
        // An attach follows a successful `try_bind_attempt`, so the entry exists unless the
        // table was full of busy sources in between; then the slot is simply not counted.
        let key = self.key(ip);
        if let Ok(held) = self.table.state_or_insert(&key, now) {
            held.bindings = held.bindings.saturating_add(1);
        }
    }

    fn detach(&mut self, ip: IpAddr) {
        let key = self.key(ip);
        if let Some(held) = self.table.state_mut(&key) {
            held.bindings = held.bindings.saturating_sub(1);
        }
    }

    fn move_slot(&mut self, from: IpAddr, to: IpAddr, now: Instant) -> Result<(), IpRefusal> {
        if self.key(from) == self.key(to) {
            return Ok(());
        }
        self.may_attach(to)?;
        self.detach(from);
        self.attach(to, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    fn v6(net: u16, host: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, net, 0, 0, 0, host))
    }

    #[test]
    fn bind_attempts_are_limited_per_ip() {
        let t0 = Instant::now();
        let limits = IpLimits {
            bind_rate: 2.0,
            bind_burst: 3,
            ..IpLimits::default()
        };
        let mut t = IpTable::new(limits);
        for _ in 0..3 {
            assert_eq!(t.try_bind_attempt(ip(1), t0), Ok(()));
        }
        assert_eq!(t.try_bind_attempt(ip(1), t0), Err(IpRefusal::RateLimited));
        // Another IP is not affected.
        assert_eq!(t.try_bind_attempt(ip(2), t0), Ok(()));
        // Half a second at 2/s buys one attempt.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(t.try_bind_attempt(ip(1), t1), Ok(()));
        assert_eq!(t.try_bind_attempt(ip(1), t1), Err(IpRefusal::RateLimited));
    }

    #[test]
    fn bindings_per_ip_are_capped_and_released() {
        let t0 = Instant::now();
        let limits = IpLimits {
            max_bindings: 2,
            ..IpLimits::default()
        };
        let mut t = IpTable::new(limits);
        for _ in 0..2 {
            t.try_bind_attempt(ip(1), t0).unwrap();
            assert_eq!(t.may_attach(ip(1)), Ok(()));
            t.attach(ip(1), t0);
        }
        assert_eq!(t.may_attach(ip(1)), Err(IpRefusal::TooManyBindings));
        t.detach(ip(1));
        assert_eq!(t.may_attach(ip(1)), Ok(()));
        assert_eq!(t.bindings(ip(1)), 1);
    }

    #[test]
    fn a_full_table_forgets_only_idle_ips() {
        let t0 = Instant::now();
        let limits = IpLimits {
            capacity: 2,
            bind_rate: 1.0,
            bind_burst: 1,
            ..IpLimits::default()
        };
        let mut t = IpTable::new(limits);
        t.try_bind_attempt(ip(1), t0).unwrap();
        t.attach(ip(1), t0);
        t.try_bind_attempt(ip(2), t0).unwrap();
        // ip(2) spent its bucket just now, ip(1) holds a slot: nothing can go.
        assert_eq!(t.try_bind_attempt(ip(3), t0), Err(IpRefusal::TableFull));
        // Once ip(2)'s bucket has refilled it holds nothing worth keeping.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(t.try_bind_attempt(ip(3), t1), Ok(()));
        assert_eq!(
            t.bindings(ip(1)),
            1,
            "an IP holding a slot is never forgotten"
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn ipv6_sources_in_one_prefix_share_a_bind_budget_and_a_binding_count() {
        let t0 = Instant::now();
        let limits = IpLimits {
            bind_rate: 1.0,
            bind_burst: 2,
            max_bindings: 2,
            ..IpLimits::default()
        };
        let mut t = IpTable::new(limits);
        // Two addresses of 2001:db8:0:1::/64 spend one budget of two attempts.
        assert_eq!(t.try_bind_attempt(v6(1, 1), t0), Ok(()));
        assert_eq!(t.try_bind_attempt(v6(1, 2), t0), Ok(()));
        assert_eq!(
            t.try_bind_attempt(v6(1, 3), t0),
            Err(IpRefusal::RateLimited)
        );
        // The next /64 has its own.
        assert_eq!(t.try_bind_attempt(v6(2, 1), t0), Ok(()));
        t.attach(v6(1, 1), t0);
        t.attach(v6(1, 2), t0);
        assert_eq!(t.bindings(v6(1, 0xffff)), 2);
        assert_eq!(t.may_attach(v6(1, 9)), Err(IpRefusal::TooManyBindings));
        assert_eq!(t.may_attach(v6(2, 9)), Ok(()));
        assert_eq!(t.len(), 2);
        // Moving a slot inside the prefix changes nothing; out of it, the count follows.
        assert_eq!(t.move_slot(v6(1, 1), v6(1, 7), t0), Ok(()));
        assert_eq!(t.bindings(v6(1, 0)), 2);
        assert_eq!(t.move_slot(v6(1, 1), v6(2, 7), t0), Ok(()));
        assert_eq!((t.bindings(v6(1, 0)), t.bindings(v6(2, 0))), (1, 1));
        // A /128 prefix counts every address alone.
        let mut t = IpTable::new(IpLimits {
            ipv6_prefix_len: 128,
            ..limits
        });
        t.attach(v6(1, 1), t0);
        assert_eq!(t.bindings(v6(1, 2)), 0);
        // A reload keeps the prefix the counts are keyed by.
        t.set_limits(IpLimits {
            ipv6_prefix_len: 48,
            ..limits
        });
        assert_eq!(t.bindings(v6(1, 1)), 1);
        assert_eq!(t.bindings(v6(1, 2)), 0);
    }

    #[test]
    fn a_full_table_does_not_sweep_for_every_new_source() {
        let t0 = Instant::now();
        let limits = IpLimits {
            capacity: 16,
            ..IpLimits::default()
        };
        let mut t = IpTable::new(limits);
        for last in 0..16 {
            t.try_bind_attempt(ip(last), t0).unwrap();
        }
        // A flood of new sources while every entry is busy: the first one sweeps, the others
        // are refused with a hash lookup each.
        for last in 16..=255 {
            assert_eq!(t.try_bind_attempt(ip(last), t0), Err(IpRefusal::TableFull));
        }
        for net in 0..1000 {
            assert_eq!(
                t.try_bind_attempt(v6(net, 1), t0 + Duration::from_millis(999)),
                Err(IpRefusal::TableFull)
            );
        }
        assert_eq!(t.sweeps(), 1);
        // A second on, the entries have refilled and the next sweep makes room.
        assert_eq!(
            t.try_bind_attempt(ip(200), t0 + Duration::from_secs(3)),
            Ok(())
        );
        assert_eq!((t.sweeps(), t.len()), (2, 1));
    }
}
