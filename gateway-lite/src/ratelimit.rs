//! Token-bucket rate limits keyed by client IP or API key, in a bounded table.
//!
//! Each key gets a bucket of `burst` tokens refilled at `rate` per second; a request takes one
//! token or is refused with the time until one is available (the `Retry-After` of the 429).
//! The table is [`ferry_core::ratelimit::KeyedLimiter`], shared with the relay's per-source
//! bind limits: it holds at most `capacity` keys, and when it is full, buckets that have
//! refilled completely (idle clients, who lose nothing by being forgotten) make room; if none
//! has, a new key is refused rather than an active one forgotten. That scan runs at most once a
//! second, so a flood of new addresses costs a hash lookup each, not a scan each. This file only
//! puts the table behind a mutex for the request handlers.

use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ferry_core::ratelimit::KeyedLimiter;
pub use ferry_core::ratelimit::Refused;

/// A table of token buckets, shared by the request handlers.
#[derive(Debug)]
pub struct RateLimiter<K> {
    inner: Mutex<KeyedLimiter<K>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter allowing `rate` requests per second with bursts of `burst`, tracking at most
    /// `capacity` keys.
    pub fn new(rate: f64, burst: u32, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(KeyedLimiter::new(rate, burst, capacity)),
        }
    }

    /// The table; a panic elsewhere cannot leave it half-updated (every change is one call).
    fn table(&self) -> MutexGuard<'_, KeyedLimiter<K>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// New limits (a config reload). Clients keep their buckets: one that holds more than the
    /// new burst is cut down to it at its next request, and a table above the new capacity
    /// shrinks as its idle entries are swept.
    pub fn set_limits(&self, rate: f64, burst: u32, capacity: usize) {
        self.table().set_limits(rate, burst, capacity);
    }

    /// Takes a token for `key` at `now`, or says how long to wait.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Refused> {
        self.table().check(key, now)
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = RateLimiter::new(2.0, 3, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check(&"a", t0).unwrap();
        }
        let refused = limiter.check(&"a", t0).unwrap_err();
        assert_eq!(refused, Refused::Empty(Duration::from_millis(500)));
        assert_eq!(refused.retry_after_secs(), 1);
        // Another key has its own bucket.
        limiter.check(&"b", t0).unwrap();
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        limiter.check(&"a", t1).unwrap();
        assert!(limiter.check(&"a", t1).is_err());
    }

    #[test]
    fn new_limits_apply_to_known_clients_at_once() {
        let limiter = RateLimiter::new(1.0, 10, 100);
        let t0 = Instant::now();
        limiter.check(&"a", t0).unwrap();
        // A tighter burst cuts the full bucket down at the next request.
        limiter.set_limits(1.0, 2, 100);
        limiter.check(&"a", t0).unwrap();
        limiter.check(&"a", t0).unwrap();
        assert!(limiter.check(&"a", t0).is_err());
        // A faster rate refills faster.
        limiter.set_limits(100.0, 2, 100);
        limiter.check(&"a", t0 + Duration::from_millis(10)).unwrap();
    }

    #[test]
    fn slow_rates_ask_for_a_longer_wait() {
        let limiter = RateLimiter::new(0.1, 1, 10);
        let t0 = Instant::now();
        limiter.check(&1, t0).unwrap();
        assert_eq!(limiter.check(&1, t0).unwrap_err().retry_after_secs(), 10);
    }

    #[test]
    fn a_full_table_forgets_idle_keys_but_never_active_ones() {
        let limiter = RateLimiter::new(1.0, 2, 2);
        let t0 = Instant::now();
        limiter.check(&1, t0).unwrap();
        limiter.check(&2, t0).unwrap();
        // Both buckets are partly used: a third key is refused rather than one forgotten.
        assert_eq!(limiter.check(&3, t0), Err(Refused::TableFull));
        // A second later both have refilled: they are idle and make room.
        let t1 = t0 + Duration::from_secs(1);
        limiter.check(&3, t1).unwrap();
        assert_eq!(limiter.len(), 1);
        // The sweep runs at most once a second.
        limiter.check(&4, t1).unwrap();
        assert_eq!(limiter.check(&5, t1), Err(Refused::TableFull));
    }
}
