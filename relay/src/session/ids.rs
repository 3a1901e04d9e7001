//! The session table's hash of session ids.
//!
//! Every DATA datagram looks its session up by id, so the hash is on the relay's hottest path.
//! std's default (SipHash-1-3) resists an attacker who picks the keys of a table's entries,
//! but nobody picks the keys of this one: a session enters the table only with a BIND whose
//! token a gateway signed, and the gateway draws each session id at random (gateway-lite's
//! `random_session_id`; docs/protocol.md relies on it to fill the shards evenly). Lookups of
//! ids that are not in the table (DATA for unknown sessions) cost one probe sequence whatever
//! their values, since only the entries decide how the table is filled.
//!
//! So the table hashes an id with two folded multiplies (of the id with two secret per-table
//! keys, then of that with a constant): a few instructions instead of SipHash's rounds, and a
//! few dozen bytes of code instead of a kilobyte, which counts below saturation, where each
//! datagram meets a cold instruction cache.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Builds [`IdHasher`]s with this table's secret keys.
#[derive(Clone, Debug)]
pub struct SessionIds {
    keys: [u64; 2],
}

impl Default for SessionIds {
    /// Keys drawn from the random seed std's `RandomState` draws for each new map.
    fn default() -> Self {
        let seed = RandomState::new();
        // The second key is made odd, so the multiply by it loses no bit of the id.
        Self {
            keys: [seed.hash_one(0u64), seed.hash_one(1u64) | 1],
        }
    }
}

impl BuildHasher for SessionIds {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            keys: self.keys,
            hash: 0,
        }
    }
}

/// The state of one hash: session ids are `u64`s, written with [`Hasher::write_u64`].
#[derive(Debug)]
pub struct IdHasher {
    keys: [u64; 2],
    hash: u64,
}

/// The fractional part of π as a 64-bit odd constant, for the second fold.
const SPREAD: u64 = 0x243f_6a88_85a3_08d3;

/// The full 128-bit product of `a` and `b`, its two halves XORed: the high half brings the
/// multiply's mixing of the high bits down into the low ones, which the table uses for the
/// bucket (the top 7 bits make the control byte).
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    // Truncation intended: the low half.
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for IdHasher {
    fn write_u64(&mut self, n: u64) {
        // One fold mixes the id's bits into both halves of the product, but ids that differ
        // only in their high bits (a stride of 2^32) leave its low bits a linear function of
        // them; the second fold, with a fixed odd constant, spreads every bit over the low ones
        // too, where the table picks the bucket.
        let once = folded_multiply(n ^ self.keys[0] ^ self.hash, self.keys[1]);
        self.hash = folded_multiply(once, SPREAD);
    }

    /// Any other key type: its bytes, eight at a time (zero-padded), each as by `write_u64`.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn one_table_hashes_one_id_alike_and_two_tables_differently() {
        let (a, b) = (SessionIds::default(), SessionIds::default());
        assert_eq!(a.hash_one(42u64), a.hash_one(42u64));
        assert_ne!(
            a.hash_one(42u64),
            b.hash_one(42u64),
            "each table draws its own keys"
        );
    }

    #[test]
    fn sequential_ids_spread_over_buckets_and_control_bytes() {
        // Ids a careless issuer might hand out: 0, 1, 2, … and multiples of a large power of
        // two. Both the low bits (the bucket) and the top 7 bits (hashbrown's control byte)
        // must take many values, or lookups would probe long chains. Random keys would hash
        // random ids like that by chance alone (about 2,590 of 4,096 buckets), so many tables'
        // keys are tried.
        for _table in 0..64 {
            let ids = SessionIds::default();
            for step in [1u64, 1 << 12, 1 << 32, 1 << 48, 1 << 52] {
                let hashes: Vec<u64> = (0..4096u64)
                    .map(|i| ids.hash_one(i.wrapping_mul(step)))
                    .collect();
                let low: HashSet<u64> = hashes.iter().map(|h| h & 4095).collect();
                let top: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
                assert!(
                    low.len() > 2400,
                    "step {step}: {} of 4096 buckets",
                    low.len()
                );
                assert_eq!(
                    top.len(),
                    128,
                    "step {step}: {} of 128 control bytes",
                    top.len()
                );
            }
        }
    }

    #[test]
    fn a_map_keyed_by_it_finds_what_it_holds() {
        let mut map: HashMap<u64, u64, SessionIds> = HashMap::default();
        for id in (0..10_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            map.insert(id, id ^ 1);
        }
        for (id, value) in &map {
            assert_eq!(map.get(id), Some(value));
            assert_eq!(*value, id ^ 1);
        }
        assert_eq!(map.len(), 10_000);
        assert_eq!(map.get(&7), None);
    }
}
