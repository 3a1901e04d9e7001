//! Rate limits and per-source-IP accounting, sans-IO (time is a parameter).
//!
//! - [`TokenBucket`]: bytes (or events) per second with a burst, in integer arithmetic.
//! - [`IpTable`]: per source IP, a bind-rate bucket and the number of slots the IP holds. It is
//!   bounded: when it is full, idle entries make room; if none is idle the new IP is refused
//!   (counted), never an existing entry forgotten while it holds slots.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// A token bucket: `rate` units per second, at most `burst` units saved up.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Units available, scaled by 10^9 so refills of a few nanoseconds are not lost.
    nano_units: u128,
    last: Instant,
}

const NANOS: u128 = 1_000_000_000;

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            nano_units: u128::from(burst) * NANOS,
            last: now,
        }
    }

    /// The refill rate, units per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now.max(self.last);
        let cap = u128::from(self.burst) * NANOS;
        self.nano_units = (self.nano_units + elapsed * u128::from(self.rate)).min(cap);
    }

    /// Takes `units` if available at `now`; returns whether it did.
    pub fn try_take(&mut self, units: u64, now: Instant) -> bool {
        self.refill(now);
        let want = u128::from(units) * NANOS;
        if self.nano_units >= want {
            self.nano_units -= want;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now` (so forgetting it changes nothing).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.nano_units >= u128::from(self.burst) * NANOS
    }

    /// Changes the rate and burst, keeping what is saved up (capped at the new burst).
    pub fn set_rate(&mut self, rate: u64, burst: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst;
        self.nano_units = self.nano_units.min(u128::from(burst) * NANOS);
    }
}

/// Per-IP limits, from the config's `[limits]` section.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IpLimits {
    /// BIND/REBIND attempts per second per source IP (after the address cookie checks out).
    pub bind_rate: f64,
    /// Attempts a source IP may make at once after a quiet period.
    pub bind_burst: u32,
    /// Slots one source IP may hold bound at once.
    pub max_bindings: u32,
    /// Source IPs tracked at once.
    pub capacity: usize,
}

impl Default for IpLimits {
    fn default() -> Self {
        Self {
            bind_rate: 20.0,
            bind_burst: 40,
            max_bindings: 64,
            capacity: 1 << 20,
        }
    }
}

/// Why [`IpTable`] refused a bind attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpRefusal {
    /// The IP is over its bind rate.
    RateLimited,
    /// The IP already holds `max_bindings` slots.
    TooManyBindings,
    /// The table is full of IPs that hold slots or have recently bound.
    TableFull,
}

#[derive(Clone, Debug)]
struct IpEntry {
    /// Bind attempts, in milli-attempts so fractional rates work.
    binds: TokenBucket,
    bindings: u32,
}

/// Bind rates and binding counts per source IP, shared by every session shard.
#[derive(Debug)]
pub struct IpTable {
    limits: IpLimits,
    entries: HashMap<IpAddr, IpEntry>,
}

impl IpTable {
    /// An empty table.
    pub fn new(limits: IpLimits) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
        }
    }

    /// Source IPs tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no IP is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Slots `ip` holds now.
    pub fn bindings(&self, ip: IpAddr) -> u32 {
        self.entries.get(&ip).map_or(0, |e| e.bindings)
    }

    /// New limits (SIGHUP); existing entries keep their state under the new rates.
    pub fn set_limits(&mut self, limits: IpLimits, now: Instant) {
        self.limits = limits;
        let (rate, burst) = Self::bind_bucket(&limits);
        for entry in self.entries.values_mut() {
            entry.binds.set_rate(rate, burst, now);
        }
    }

    fn bind_bucket(limits: &IpLimits) -> (u64, u64) {
        let rate = (limits.bind_rate * 1000.0).round().max(1.0) as u64;
        (rate, u64::from(limits.bind_burst.max(1)) * 1000)
    }

    fn entry(&mut self, ip: IpAddr, now: Instant) -> Result<&mut IpEntry, IpRefusal> {
        if !self.entries.contains_key(&ip) && self.entries.len() >= self.limits.capacity {
            // Make room: forget IPs that hold nothing and whose bucket has refilled, which is
            // exactly the state a new entry starts in.
            self.entries
                .retain(|_, e| e.bindings > 0 || !e.binds.is_full(now));
            if self.entries.len() >= self.limits.capacity {
                return Err(IpRefusal::TableFull);
            }
        }
        let (rate, burst) = Self::bind_bucket(&self.limits);
        Ok(self.entries.entry(ip).or_insert_with(|| IpEntry {
            binds: TokenBucket::new(rate, burst, now),
            bindings: 0,
        }))
    }

    /// Charges one bind attempt to `ip`; refuses when over its rate.
    pub fn try_bind_attempt(&mut self, ip: IpAddr, now: Instant) -> Result<(), IpRefusal> {
        let entry = self.entry(ip, now)?;
        match entry.binds.try_take(1000, now) {
            true => Ok(()),
            false => Err(IpRefusal::RateLimited),
        }
    }

    /// Whether `ip` may take one more slot.
    pub fn may_attach(&self, ip: IpAddr) -> Result<(), IpRefusal> {
        match self.bindings(ip) < self.limits.max_bindings {
            true => Ok(()),
            false => Err(IpRefusal::TooManyBindings),
        }
    }

    /// Records that `ip` now holds one more slot.
    pub fn attach(&mut self, ip: IpAddr, now: Instant) {
        // An attach follows a successful `try_bind_attempt`, so the entry exists unless the
        // table was full of busy IPs in between; then the slot is simply not counted.
        if let Ok(entry) = self.entry(ip, now) {
            entry.bindings = entry.bindings.saturating_add(1);
        }
    }

    /// Records that `ip` gave up one slot.
    pub fn detach(&mut self, ip: IpAddr) {
        if let Some(entry) = self.entries.get_mut(&ip) {
            entry.bindings = entry.bindings.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    #[test]
    fn bucket_spends_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 1500, t0);
        assert!(b.try_take(1500, t0));
        assert!(!b.try_take(1, t0));
        // 100 ms at 1000/s is 100 units.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.try_take(100, t1));
        assert!(!b.try_take(1, t1));
        // Never more than the burst, however long it waits.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(b.is_full(t2));
        assert!(b.try_take(1500, t2));
        assert!(!b.try_take(1, t2));
    }

    #[test]
    fn bucket_tolerates_time_going_backwards() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(10, 10, t0);
        assert!(b.try_take(10, t0));
        assert!(!b.try_take(1, t0 - Duration::from_secs(5)));
        assert!(b.try_take(10, t0 + Duration::from_secs(1)));
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
}
