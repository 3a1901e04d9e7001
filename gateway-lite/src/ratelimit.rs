//! Token-bucket rate limits keyed by client IP or API key, in a bounded table.
//!
//! Each key gets a bucket of `burst` tokens refilled at `rate` per second; a request takes one
//! token or is refused with the time until one is available (the `Retry-After` of the 429).
//! The table holds at most `capacity` keys: when it is full, buckets that have refilled
//! completely (idle clients, who lose nothing by being forgotten) make room; if none has, a new
//! key is refused rather than an active one forgotten. That scan runs at most once a second, so
//! a flood of new addresses costs a hash lookup each, not a scan each.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A table of token buckets.
#[derive(Debug)]
pub struct RateLimiter<K> {
    inner: Mutex<Table<K>>,
}

#[derive(Debug)]
struct Table<K> {
    rate: f64,
    burst: f64,
    capacity: usize,
    buckets: HashMap<K, Bucket>,
    last_sweep: Option<Instant>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The key's bucket is empty; a token is back after this long.
    Empty(Duration),
    /// The table is full of active keys; try again in a second.
    TableFull,
}

impl Refused {
    /// The `Retry-After` to send, whole seconds, at least 1.
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Self::Empty(wait) => wait.as_secs_f64().ceil().max(1.0) as u64,
            Self::TableFull => 1,
        }
    }
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter allowing `rate` requests per second with bursts of `burst`, tracking at most
    /// `capacity` keys.
    pub fn new(rate: f64, burst: u32, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Table {
                rate,
                burst: f64::from(burst.max(1)),
                capacity: capacity.max(1),
                buckets: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    /// New limits (a config reload). Clients keep their buckets: one that holds more than the
    /// new burst is cut down to it at its next request, and a table above the new capacity
    /// shrinks as its idle entries are swept.
    pub fn set_limits(&self, rate: f64, burst: u32, capacity: usize) {
        let mut table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table.rate = rate;
        table.burst = f64::from(burst.max(1));
        table.capacity = capacity.max(1);
    }

    /// Takes a token for `key` at `now`, or says how long to wait.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Refused> {
        let mut table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (rate, burst, capacity) = (table.rate, table.burst, table.capacity);
        if !table.buckets.contains_key(key) && table.buckets.len() >= capacity {
            let due = table
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            if due {
                table.last_sweep = Some(now);
                table.buckets.retain(|_, b| {
                    let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
                    b.tokens + elapsed * rate < burst
                });
            }
            if table.buckets.len() >= capacity {
                return Err(Refused::TableFull);
            }
        }
        let bucket = table.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / rate;
            Err(Refused::Empty(Duration::from_secs_f64(wait)))
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|t| t.buckets.len())
            .unwrap_or_default()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
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
