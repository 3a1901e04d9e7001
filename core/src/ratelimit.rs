//! Token buckets, alone and in a bounded table keyed by client, sans-IO: time is a parameter
//! (`now`), and nothing here locks. The relay's per-slot byte budgets are single
//! [`TokenBucket`]s; the relay's per-source bind limits and the gateway's per-IP and per-key
//! request limits are [`KeyedLimiter`]s, wrapped by their owners in whatever lock they need.
//!
//! All arithmetic is in integers: a bucket's level is kept in units scaled by 10^9, so a refill
//! of a few nanoseconds is not lost and a wait is exact to the nanosecond.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

const NANOS: u128 = 1_000_000_000;

/// What a bucket holds at a point in time, without its rate and burst (a [`KeyedLimiter`]
/// keeps one rate for all its keys, so its entries hold only this).
#[derive(Clone, Copy, Debug)]
struct Level {
    /// Units available, scaled by 10^9.
    nano_units: u128,
    last: Instant,
}

impl Level {
    fn full(burst: u64, now: Instant) -> Self {
        Self {
            nano_units: u128::from(burst) * NANOS,
            last: now,
        }
    }

    /// The level at `now`, refilled at `rate` and capped at `burst`, without changing `self`.
    fn at(&self, rate: u64, burst: u64, now: Instant) -> u128 {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let cap = u128::from(burst) * NANOS;
        self.nano_units
            .saturating_add(elapsed.saturating_mul(u128::from(rate)))
            .min(cap)
    }

    fn refill(&mut self, rate: u64, burst: u64, now: Instant) {
        self.nano_units = self.at(rate, burst, now);
        self.last = now.max(self.last);
    }

    /// Takes `units` at `now`, or says how long until they are there.
    fn try_take(
        &mut self,
        units: u64,
        rate: u64,
        burst: u64,
        now: Instant,
    ) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        let want = u128::from(units) * NANOS;
        match self.nano_units.checked_sub(want) {
            Some(left) => {
                self.nano_units = left;
                Ok(())
            }
            None => {
                // Units scaled by 10^9 over units per second: nanoseconds.
                let nanos = (want - self.nano_units).div_ceil(u128::from(rate.max(1)));
                Err(Duration::from_nanos(
                    u64::try_from(nanos).unwrap_or(u64::MAX),
                ))
            }
        }
    }

    fn is_full(&self, rate: u64, burst: u64, now: Instant) -> bool {
        self.at(rate, burst, now) >= u128::from(burst) * NANOS
    }
}

/// A token bucket: `rate` units per second, at most `burst` units saved up.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    level: Level,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            level: Level::full(burst, now),
        }
    }

    /// The refill rate, units per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `units` if available at `now`; returns whether it did.
    pub fn try_take(&mut self, units: u64, now: Instant) -> bool {
        self.level
            .try_take(units, self.rate, self.burst, now)
            .is_ok()
    }

    /// Whether the bucket is full at `now` (so forgetting it changes nothing).
    pub fn is_full(&self, now: Instant) -> bool {
        self.level.is_full(self.rate, self.burst, now)
    }

    /// Changes the rate and burst, keeping what is saved up (capped at the new burst).
    pub fn set_rate(&mut self, rate: u64, burst: u64, now: Instant) {
        self.level.refill(self.rate, self.burst, now);
        self.rate = rate;
        self.burst = burst;
        self.level.refill(rate, burst, now);
    }
}

/// Why a [`KeyedLimiter`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The key's bucket is empty; a token is back after this long.
    Empty(Duration),
    /// The table is full of keys that are not idle; the key was not added. A sweep for idle
    /// keys runs at most once a second, so try again in a second.
    TableFull,
}

impl Refused {
    /// Whole seconds to wait before trying again, at least 1 (an HTTP `Retry-After`).
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Self::Empty(wait) => (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
            Self::TableFull => 1,
        }
    }
}

/// State a [`KeyedLimiter`] keeps per key next to its bucket (`()` for none).
pub trait KeyState: Default {
    /// Whether forgetting this state loses nothing. A key is forgotten to make room only when
    /// its bucket is full and this is true.
    fn is_idle(&self) -> bool;
}

impl KeyState for () {
    fn is_idle(&self) -> bool {
        true
    }
}

/// How one request is counted: a whole token, in millionths so that fractional rates (a
/// request every ten seconds) work in integers.
const PER_REQUEST: u64 = 1_000_000;

#[derive(Debug)]
struct Entry<S> {
    level: Level,
    state: S,
}

/// Token buckets keyed by client (an address, a prefix, an API key), in a bounded table.
///
/// Each key gets a bucket of `burst` requests refilled at `rate` per second, and a
/// [`KeyState`] of its owner's. The table holds at most `capacity` keys: when it is full and a
/// new key arrives, keys that are idle (bucket full again, state idle: their client loses
/// nothing by being forgotten) make room; if none is, the new key is refused rather than an
/// active one forgotten. That sweep runs at most once a second, so a flood of new keys costs a
/// hash lookup each, not a scan of the table each.
#[derive(Debug)]
pub struct KeyedLimiter<K, S = ()> {
    /// Refill rate, millionths of a request per second.
    rate: u64,
    /// Burst, millionths of a request.
    burst: u64,
    capacity: usize,
    entries: HashMap<K, Entry<S>>,
    last_sweep: Option<Instant>,
    sweeps: u64,
}

/// Time between two sweeps of a full table.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl<K: Hash + Eq + Clone, S: KeyState> KeyedLimiter<K, S> {
    /// A table allowing `rate` requests per second per key with bursts of `burst`, holding at
    /// most `capacity` keys.
    pub fn new(rate: f64, burst: u32, capacity: usize) -> Self {
        let mut table = Self {
            rate: 0,
            burst: 0,
            capacity: 0,
            entries: HashMap::new(),
            last_sweep: None,
            sweeps: 0,
        };
        table.set_limits(rate, burst, capacity);
        table
    }

    /// New limits. Keys keep their buckets: each refills at the new rate from its last request
    /// on, and one that holds more than the new burst is cut down to it at its next request. A
    /// table above the new capacity shrinks as its idle keys are swept.
    pub fn set_limits(&mut self, rate: f64, burst: u32, capacity: usize) {
        // `as` saturates, and NaN becomes 0: every rate is at least a millionth per second.
        self.rate = ((rate * PER_REQUEST as f64).round() as u64).max(1);
        self.burst = u64::from(burst.max(1)) * PER_REQUEST;
        self.capacity = capacity.max(1);
    }

    /// The entry of `key`, added with a full bucket if it is new and there is room.
    fn entry(&mut self, key: &K, now: Instant) -> Result<&mut Entry<S>, Refused> {
        if !self.entries.contains_key(key) && self.entries.len() >= self.capacity {
            let due = self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL);
            if due {
                self.sweep(now);
            }
            if self.entries.len() >= self.capacity {
                return Err(Refused::TableFull);
            }
        }
        let burst = self.burst;
        Ok(self.entries.entry(key.clone()).or_insert_with(|| Entry {
            level: Level::full(burst, now),
            state: S::default(),
        }))
    }

    /// Forgets every idle key.
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        self.sweeps += 1;
        let (rate, burst) = (self.rate, self.burst);
        self.entries
            .retain(|_, e| !(e.level.is_full(rate, burst, now) && e.state.is_idle()));
    }

    /// Takes one request from `key`'s bucket at `now`, or says why not.
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Refused> {
        let (rate, burst) = (self.rate, self.burst);
        let entry = self.entry(key, now)?;
        entry
            .level
            .try_take(PER_REQUEST, rate, burst, now)
            .map_err(Refused::Empty)
    }

    /// The state of `key`, added (with a full bucket) if it is new and there is room.
    pub fn state_or_insert(&mut self, key: &K, now: Instant) -> Result<&mut S, Refused> {
        self.entry(key, now).map(|e| &mut e.state)
    }

    /// The state of `key`, if it is tracked.
    pub fn state(&self, key: &K) -> Option<&S> {
        self.entries.get(key).map(|e| &e.state)
    }

    /// The state of `key` to change, if it is tracked.
    pub fn state_mut(&mut self, key: &K) -> Option<&mut S> {
        self.entries.get_mut(key).map(|e| &mut e.state)
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many times the table has been swept for idle keys.
    pub fn sweeps(&self) -> u64 {
        self.sweeps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_new_rate_keeps_what_is_saved_up_capped_at_the_new_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 1000, t0);
        assert!(b.try_take(400, t0));
        b.set_rate(10, 200, t0);
        assert_eq!(b.rate(), 10);
        assert!(b.try_take(200, t0));
        assert!(!b.try_take(1, t0));
        assert!(b.try_take(10, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_key_waits_exactly_until_its_next_request() {
        let t0 = Instant::now();
        let mut t: KeyedLimiter<&str> = KeyedLimiter::new(2.0, 3, 100);
        for _ in 0..3 {
            t.check(&"a", t0).unwrap();
        }
        let refused = t.check(&"a", t0).unwrap_err();
        assert_eq!(refused, Refused::Empty(Duration::from_millis(500)));
        assert_eq!(refused.retry_after_secs(), 1);
        // Another key has its own bucket.
        t.check(&"b", t0).unwrap();
        let slow: &mut KeyedLimiter<u8> = &mut KeyedLimiter::new(0.1, 1, 10);
        slow.check(&1, t0).unwrap();
        assert_eq!(slow.check(&1, t0).unwrap_err().retry_after_secs(), 10);
    }

    #[derive(Default)]
    struct Holds(u32);

    impl KeyState for Holds {
        fn is_idle(&self) -> bool {
            self.0 == 0
        }
    }

    #[test]
    fn a_full_table_forgets_only_idle_keys() {
        let t0 = Instant::now();
        let mut t: KeyedLimiter<u8, Holds> = KeyedLimiter::new(1.0, 1, 2);
        t.check(&1, t0).unwrap();
        t.state_or_insert(&1, t0).unwrap().0 = 1;
        t.check(&2, t0).unwrap();
        // Key 2 spent its bucket just now, key 1 holds something: nothing can go.
        assert_eq!(t.check(&3, t0), Err(Refused::TableFull));
        // Two seconds later both buckets are full, but key 1 still holds something.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(t.check(&3, t1), Ok(()));
        assert_eq!(t.state(&1).map(|s| s.0), Some(1));
        assert!(t.state(&2).is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut t: KeyedLimiter<u32> = KeyedLimiter::new(1.0, 1, 100);
        for key in 0..100 {
            t.check(&key, t0).unwrap();
        }
        // A flood of new keys while every bucket is in use: one sweep, not one per key.
        for key in 100..10_000 {
            assert_eq!(t.check(&key, t0), Err(Refused::TableFull));
        }
        assert_eq!(t.sweeps(), 1);
        let t1 = t0 + Duration::from_millis(999);
        for key in 10_000..10_100 {
            assert_eq!(t.check(&key, t1), Err(Refused::TableFull));
        }
        assert_eq!(t.sweeps(), 1);
        // A second after the last sweep the idle keys make room.
        let t2 = t0 + Duration::from_secs(1);
        t.check(&20_000, t2).unwrap();
        assert_eq!((t.sweeps(), t.len()), (2, 1));
        // Keys already tracked never trigger a sweep.
        for _ in 0..10 {
            let _ = t.check(&20_000, t2);
        }
        assert_eq!(t.sweeps(), 2);
    }

    #[test]
    fn new_limits_apply_to_known_keys_at_their_next_request() {
        let t0 = Instant::now();
        let mut t: KeyedLimiter<&str> = KeyedLimiter::new(1.0, 10, 100);
        t.check(&"a", t0).unwrap();
        t.set_limits(1.0, 2, 100);
        t.check(&"a", t0).unwrap();
        t.check(&"a", t0).unwrap();
        assert!(t.check(&"a", t0).is_err());
        t.set_limits(100.0, 2, 100);
        t.check(&"a", t0 + Duration::from_millis(10)).unwrap();
    }
}
