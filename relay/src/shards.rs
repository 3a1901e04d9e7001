//! The session tables every worker shares, sharded by session id.
//!
//! `SO_REUSEPORT` hashes each source 4-tuple to one worker, so the two directions of a session
//! usually arrive on different workers. Both must reach the same session state, so the state is
//! shared: [`Sessions`] holds a power-of-two number of [`SessionTable`] shards, each behind its
//! own mutex, and a datagram locks only the shard of its session id. A DATA datagram holds the
//! lock for one hash lookup, an address compare and a token-bucket update; two workers contend
//! only when they touch the same shard at the same instant. Session ids are random (the gateway
//! draws them), so shards fill evenly. docs/architecture.md records why this was chosen over
//! steering with a reuseport eBPF program.
//!
//! Limits that span sessions live outside the shards: per-source-IP accounting in one shared
//! [`IpTable`] (touched only by BIND/REBIND, close and reap), and the session cap, which each
//! shard enforces for its share (`max_sessions / shards`, rounded up).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_core::proof::CookieJar;
use ferry_core::time::UnixTime;
use ferry_core::token::TokenVerifier;

use crate::limits::{IpLimits, IpTable};
use crate::session::{Counters, Outcome, SessionEvent, SessionLimits, SessionTable, lock};

/// Told when a session opens or is forgotten, in order per session: the XDP guard's session
/// filter (`crate::xdp::SessionFilter`) follows the tables this way.
pub trait SessionObserver: Send + Sync + std::fmt::Debug {
    /// Called with the shard's lock held, so events of one session arrive in order.
    fn session_event(&self, event: SessionEvent);
}

/// Shards per relay. A power of two well above the worker count keeps contention rare.
pub const SHARDS: usize = 64;

/// All sessions of the relay, shared by every worker.
pub struct Sessions {
    shards: Vec<Mutex<SessionTable>>,
    ips: Arc<Mutex<IpTable>>,
    observer: Option<Arc<dyn SessionObserver>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The cap each shard enforces so that the shards together hold at most about `total`.
fn per_shard_cap(total: usize) -> usize {
    total.div_ceil(SHARDS).max(1)
}

/// One shard's share of the relay-wide limits.
fn shard_limits(limits: SessionLimits) -> SessionLimits {
    SessionLimits {
        max_sessions: per_shard_cap(limits.max_sessions),
        replay_cache_capacity: per_shard_cap(limits.replay_cache_capacity),
        ..limits
    }
}

impl Sessions {
    /// Empty tables. Every shard verifies tokens with a copy of `verifier` and checks cookies
    /// with the same secret, so a cookie issued by one shard is valid in all of them.
    pub fn new(
        limits: SessionLimits,
        ip_limits: IpLimits,
        verifier: TokenVerifier,
        cookies: CookieJar,
    ) -> Self {
        let ips = Arc::new(Mutex::new(IpTable::new(ip_limits)));
        let shard_limits = shard_limits(limits);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(SessionTable::new(
                    shard_limits.clone(),
                    verifier.clone(),
                    cookies.clone(),
                    Arc::clone(&ips),
                ))
            })
            .collect();
        Self {
            shards,
            ips,
            observer: None,
        }
    }

    /// Reports every session opened or forgotten from now on to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        for shard in &self.shards {
            lock(shard).record_events();
        }
        self.observer = Some(observer);
        self
    }

    /// Hands the shard's recorded events to the observer (with the shard still locked).
    fn report(&self, table: &mut SessionTable) {
        if let Some(observer) = &self.observer {
            for event in table.drain_events() {
                observer.session_event(event);
            }
        }
    }

    /// The shard that owns `session_id`.
    fn shard(&self, session_id: u64) -> &Mutex<SessionTable> {
        // SHARDS is a power of two; the mask keeps the index in range.
        let index = (session_id as usize) & (SHARDS - 1);
        &self.shards[index]
    }

    /// Handles one datagram (see [`SessionTable::handle`]).
    pub fn handle(
        &self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        // Anything without a valid header is counted by shard 0, so the common case pays for
        // one parse of 16 bytes before the lock and one after it.
        let session_id = ferry_common::header::parse_header(datagram)
            .map(|h| h.session_id)
            .unwrap_or(0);
        let mut table = lock(self.shard(session_id));
        let outcome = table.handle(now, wall, from, datagram, reply);
        self.report(&mut table);
        outcome
    }

    /// Reaps idle and expired bindings in every shard; returns how many went.
    pub fn reap(&self, now: Instant, wall: UnixTime) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut table = lock(shard);
                let reaped = table.reap(now, wall);
                self.report(&mut table);
                reaped
            })
            .sum()
    }

    /// The counters of all shards, summed.
    pub fn counters(&self) -> Counters {
        let mut total = Counters::default();
        for shard in &self.shards {
            total.add(lock(shard).counters());
        }
        total
    }

    /// Sessions held now, and slots bound now.
    pub fn occupancy(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(s, b), shard| {
            let shard = lock(shard);
            (s + shard.session_count(), b + shard.binding_count())
        })
    }

    /// Source IPs tracked by the per-IP limits.
    pub fn tracked_ips(&self) -> usize {
        lock(&self.ips).len()
    }

    /// Applies reloaded limits and trusted gateway keys to every shard without dropping a
    /// session (SIGHUP). `keys` replaces the trusted set entirely.
    pub fn reload(
        &self,
        now: Instant,
        limits: SessionLimits,
        ip_limits: IpLimits,
        keys: &[(u32, ferry_core::keys::GatewayPublicKey)],
    ) {
        let shard_limits = shard_limits(limits);
        for shard in &self.shards {
            let mut table = lock(shard);
            table.set_limits(shard_limits.clone(), now);
            let verifier = table.verifier_mut();
            let old: Vec<u32> = verifier.trusted_kids().collect();
            for kid in old {
                verifier.remove_trusted_key(kid);
            }
            for (kid, key) in keys {
                verifier.add_trusted_key(*kid, *key);
            }
        }
        lock(&self.ips).set_limits(ip_limits, now);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use ferry_core::keys::{GatewaySigningKey, RelayStaticKey};
    use ferry_core::proof::SlotKeys;
    use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter, VerifierConfig};
    use ferry_core::wire::{self, BindFields, MAX_DATAGRAM, Packet, Slot};
    use ring::rand::SystemRandom;

    use super::*;

    const T0: UnixTime = UnixTime(1_900_000_000);

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)), 4000)
    }

    struct Relay {
        sessions: Sessions,
        minter: TokenMinter,
        relay_public: ferry_core::keys::RelayPublicKey,
        rng: SystemRandom,
        now: Instant,
        reply: Vec<u8>,
    }

    impl Relay {
        fn new(limits: SessionLimits) -> Self {
            let rng = SystemRandom::new();
            let relay = RelayStaticKey::generate(&rng).unwrap();
            let relay_public = relay.public();
            let minter = TokenMinter::new(1, GatewaySigningKey::generate(&rng).unwrap());
            let mut verifier = TokenVerifier::new(VerifierConfig::new(5), relay).unwrap();
            verifier.add_trusted_key(1, minter.public());
            let cookies = CookieJar::generate(&rng).unwrap();
            Self {
                sessions: Sessions::new(limits, IpLimits::default(), verifier, cookies),
                minter,
                relay_public,
                rng,
                now: Instant::now(),
                reply: vec![0; MAX_DATAGRAM],
            }
        }

        fn mint(&self, minter: &TokenMinter, sid: u64, slot: Slot) -> MintedToken {
            let input = ClaimsInput {
                slot,
                relay_id: 5,
                session_id: sid,
                not_before: T0,
                expires: T0.saturating_add(600),
                rate_bytes_per_sec: 0,
            };
            minter.mint(&self.rng, &input, &self.relay_public).unwrap()
        }

        /// BIND (through the CHALLENGE) and return the relay's final answer packet type.
        fn bind(&mut self, from: SocketAddr, token: &MintedToken, slot: Slot) -> Packet<'_> {
            let keys = SlotKeys::derive(&token.slot_secret);
            let sid = token.claims.session_id;
            let mut buf = vec![0; MAX_DATAGRAM];
            let mut cookie = [0; 16];
            for seq in 1..=2 {
                let fields = BindFields {
                    slot,
                    bind_seq: seq,
                    cookie,
                    token: &token.bytes,
                };
                let n = wire::encode_bind(&mut buf, sid, &fields, |m| keys.peer.mac(m)).unwrap();
                let outcome = self
                    .sessions
                    .handle(self.now, T0, from, &buf[..n], &mut self.reply);
                let Outcome::Reply { len, .. } = outcome else {
                    panic!("no answer: {outcome:?}");
                };
                if seq == 1 {
                    let Ok(Packet::Challenge(c)) = wire::parse(&self.reply[..len]) else {
                        panic!("expected CHALLENGE");
                    };
                    cookie = *c.cookie();
                } else {
                    return wire::parse(&self.reply[..len]).unwrap();
                }
            }
            unreachable!()
        }
    }

    #[test]
    fn sessions_in_different_shards_forward_and_counters_sum_up() {
        let mut r = Relay::new(SessionLimits::default());
        for (k, sid) in [7u64, 8, 7 + SHARDS as u64].into_iter().enumerate() {
            let a = r.mint(&r.minter, sid, Slot::A);
            let b = r.mint(&r.minter, sid, Slot::B);
            let (pa, pb) = (addr(10 + 2 * k as u8), addr(11 + 2 * k as u8));
            assert!(matches!(r.bind(pa, &a, Slot::A), Packet::BindAck(_)));
            assert!(matches!(r.bind(pb, &b, Slot::B), Packet::BindAck(_)));
            let mut data = vec![0; MAX_DATAGRAM];
            let n = wire::encode_data(&mut data, sid, b"opaque").unwrap();
            let outcome = r.sessions.handle(r.now, T0, pa, &data[..n], &mut r.reply);
            assert_eq!(outcome, Outcome::Forward { to: pb });
        }
        let counters = r.sessions.counters();
        assert_eq!(counters.forwarded, 3);
        assert_eq!(counters.binds_accepted, 6);
        assert_eq!(counters.challenges, 6);
        assert_eq!(r.sessions.occupancy(), (3, 6));
        assert_eq!(r.sessions.tracked_ips(), 6);
        // Garbage is counted once, by the shard for session 0.
        let outcome = r
            .sessions
            .handle(r.now, T0, addr(99), b"junk", &mut r.reply);
        assert!(matches!(outcome, Outcome::Drop(_)));
        assert_eq!(r.sessions.counters().malformed, 1);
        // Everything idles out.
        let later = r.now + std::time::Duration::from_secs(3600);
        assert_eq!(r.sessions.reap(later, T0), 6);
        assert_eq!(r.sessions.occupancy(), (0, 0));
    }

    #[test]
    fn reload_swaps_trusted_keys_in_every_shard_without_dropping_sessions() {
        let mut r = Relay::new(SessionLimits::default());
        let a = r.mint(&r.minter, 3, Slot::A);
        assert!(matches!(r.bind(addr(1), &a, Slot::A), Packet::BindAck(_)));
        // Rotate: trust only a new gateway key.
        let rotated = TokenMinter::new(2, GatewaySigningKey::generate(&r.rng).unwrap());
        let keys = [(2, rotated.public())];
        r.sessions
            .reload(r.now, SessionLimits::default(), IpLimits::default(), &keys);
        for sid in [4u64, 5] {
            let old = r.mint(&r.minter, sid, Slot::A);
            assert!(matches!(r.bind(addr(2), &old, Slot::A), Packet::Reject(_)));
            let new = r.mint(&rotated, sid, Slot::A);
            assert!(matches!(r.bind(addr(3), &new, Slot::A), Packet::BindAck(_)));
        }
        assert_eq!(
            r.sessions.occupancy(),
            (3, 3),
            "the session bound before stays"
        );
    }

    #[test]
    fn the_session_cap_is_shared_out_over_the_shards() {
        assert_eq!(per_shard_cap(100_000), 1563);
        assert_eq!(per_shard_cap(1), 1);
        let limits = SessionLimits {
            max_sessions: 1,
            ..SessionLimits::default()
        };
        let mut r = Relay::new(limits);
        let first = r.mint(&r.minter, 1, Slot::A);
        assert!(matches!(
            r.bind(addr(1), &first, Slot::A),
            Packet::BindAck(_)
        ));
        let same_shard = r.mint(&r.minter, 1 + SHARDS as u64, Slot::A);
        assert!(matches!(
            r.bind(addr(2), &same_shard, Slot::A),
            Packet::Reject(_)
        ));
    }
}
