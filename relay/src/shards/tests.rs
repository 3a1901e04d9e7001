use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::sync::{OnceLock, Weak};

use ferry_core::keys::{GatewaySigningKey, RelayStaticKey};
use ferry_core::proof::SlotKeys;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter, VerifierConfig};
use ferry_core::wire::{self, BindFields, MAX_DATAGRAM, Packet, Slot};
use ring::rand::SystemRandom;

use super::*;
use crate::session::{Input, NoticeKind};

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

    /// A BIND for `token` with `cookie`, proved with `keys`.
    fn bind_packet(
        token: &MintedToken,
        slot: Slot,
        seq: u64,
        cookie: [u8; 16],
        keys: &SlotKeys,
    ) -> Vec<u8> {
        let fields = BindFields {
            slot,
            bind_seq: seq,
            cookie,
            token: &token.bytes,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_bind(&mut buf, token.claims.session_id, &fields, |m| {
            keys.peer.mac(m)
        })
        .unwrap();
        buf.truncate(n);
        buf
    }

    /// The cookie the relay hands `from` for `token`'s slot.
    fn cookie(&mut self, from: SocketAddr, token: &MintedToken, slot: Slot) -> [u8; 16] {
        let keys = SlotKeys::derive(&token.slot_secret);
        let probe = Self::bind_packet(token, slot, 1, [0; 16], &keys);
        let outcome = self
            .sessions
            .handle(self.now, T0, from, None, &probe, &mut self.reply);
        let Outcome::Reply { len, .. } = outcome else {
            panic!("no answer: {outcome:?}");
        };
        let Ok(Packet::Challenge(c)) = wire::parse(&self.reply[..len]) else {
            panic!("expected CHALLENGE");
        };
        *c.cookie()
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
            let outcome =
                self.sessions
                    .handle(self.now, T0, from, None, &buf[..n], &mut self.reply);
            // The BIND that completes a session also notifies the other slot's peer.
            let (Outcome::Reply { len, .. } | Outcome::ReplyAndNotify { len, .. }) = outcome else {
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
        let outcome = r
            .sessions
            .handle(r.now, T0, pa, None, &data[..n], &mut r.reply);
        assert_eq!(outcome, Outcome::Forward { to: pb, src: None });
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
        .handle(r.now, T0, addr(99), None, b"junk", &mut r.reply);
    assert!(matches!(outcome, Outcome::Drop(_)));
    assert_eq!(r.sessions.counters().malformed, 1);
    // Everything idles out.
    let later = r.now + Duration::from_secs(3600);
    let mut notices = Vec::new();
    assert_eq!(r.sessions.reap(later, T0, &mut notices), 6);
    assert_eq!(r.sessions.occupancy(), (0, 0));
    // Each reaped peer is told, and the shards' notice counters sum up.
    assert_eq!(notices.len(), 6);
    let counters = r.sessions.counters();
    assert_eq!(counters.notices(NoticeKind::Idle), 6);
    assert_eq!(counters.notices(NoticeKind::PeerPresent), 3);
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

/// Runs `work` on another thread while this one holds the lock of `sid`'s shard, and
/// returns what it sent back; fails (after releasing the lock) if it waited for the lock.
fn with_shard_locked<T: Send>(sessions: &Sessions, sid: u64, work: impl FnOnce() -> T + Send) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let held = lock(&sessions.shard(sid).table);
        s.spawn(move || tx.send(work()));
        let got = rx.recv_timeout(Duration::from_secs(20));
        drop(held);
        got.expect("the work waited for the shard lock")
    })
}

#[test]
#[allow(clippy::result_large_err)] // as `session::check`
fn tokens_and_proofs_are_verified_without_the_shard_lock() {
    let mut r = Relay::new(SessionLimits::default());
    let sid = 0x77;
    let from = addr(1);
    let token = r.mint(&r.minter, sid, Slot::A);
    let keys = SlotKeys::derive(&token.slot_secret);
    let cookie = r.cookie(from, &token, Slot::A);
    let (now, sessions) = (r.now, &r.sessions);

    // A token from a gateway the relay does not trust: verified, refused and counted while
    // another worker holds the session's shard.
    let stranger = TokenMinter::new(1, GatewaySigningKey::generate(&r.rng).unwrap());
    let forged = r.mint(&stranger, sid, Slot::A);
    let bind = Relay::bind_packet(&forged, Slot::A, 2, cookie, &keys);
    let reply = with_shard_locked(sessions, sid, || {
        let mut reply = vec![0; MAX_DATAGRAM];
        let outcome = sessions.handle(now, T0, from, None, &bind, &mut reply);
        let Outcome::Reply { len, .. } = outcome else {
            panic!("expected a REJECT, got {outcome:?}");
        };
        reply.truncate(len);
        reply
    });
    let Ok(Packet::Reject(reject)) = wire::parse(&reply) else {
        panic!("expected a REJECT");
    };
    assert_eq!(reject.reason(), wire::RejectReason::TokenInvalid);
    // A good token with a wrong proof: the same.
    let wrong = SlotKeys::derive(&r.mint(&r.minter, sid, Slot::A).slot_secret);
    let bind = Relay::bind_packet(&token, Slot::A, 2, cookie, &wrong);
    let outcome = with_shard_locked(sessions, sid, || {
        sessions.handle(now, T0, from, None, &bind, &mut vec![0; MAX_DATAGRAM])
    });
    assert!(matches!(outcome, Outcome::Reply { .. }), "{outcome:?}");
    let rejected = sessions.counters().binds_rejected;
    assert_eq!(
        rejected[wire::RejectReason::TokenInvalid.as_u8() as usize],
        1
    );
    assert_eq!(rejected[wire::RejectReason::BadProof.as_u8() as usize], 1);

    // A good BIND is verified with the shard locked too; only binding it needs the lock.
    let bind = Relay::bind_packet(&token, Slot::A, 2, cookie, &keys);
    let checked = with_shard_locked(sessions, sid, || {
        sessions.check(now, T0, from, None, &bind, &mut vec![0; MAX_DATAGRAM])
    });
    let Ok(input @ Input::Bind(_)) = checked else {
        panic!("expected a verified BIND, got {checked:?}");
    };
    assert_eq!(sessions.occupancy(), (0, 0), "checking binds nothing");
    let outcome = sessions.apply(now, T0, Ok(input), &mut r.reply);
    let Outcome::Reply { len, .. } = outcome else {
        panic!("expected a BIND-ACK, got {outcome:?}");
    };
    assert!(matches!(
        wire::parse(&r.reply[..len]),
        Ok(Packet::BindAck(_))
    ));
    assert_eq!(sessions.occupancy(), (1, 1));
}

/// Records each event and whether its shard was unlocked when it arrived.
#[derive(Debug, Default)]
struct Recorder {
    sessions: OnceLock<Weak<Sessions>>,
    seen: Mutex<Vec<(SessionEvent, bool)>>,
}

impl SessionObserver for Recorder {
    fn session_event(&self, event: SessionEvent) {
        let sid = event.session();
        let sessions = self.sessions.get().and_then(Weak::upgrade).unwrap();
        let unlocked = sessions.shard(sid).table.try_lock().is_ok();
        lock(&self.seen).push((event, unlocked));
    }
}

#[test]
fn events_reach_the_observer_outside_the_shard_lock_and_bound_before_the_ack() {
    let mut r = Relay::new(SessionLimits::default());
    let recorder = Arc::new(Recorder::default());
    let placeholder = Relay::new(SessionLimits::default()).sessions;
    let sessions = std::mem::replace(&mut r.sessions, placeholder);
    let sessions = Arc::new(sessions.with_observer(Arc::clone(&recorder) as _));
    recorder.sessions.set(Arc::downgrade(&sessions)).unwrap();
    let (sid, from) = (0x99, addr(1));
    let token = r.mint(&r.minter, sid, Slot::A);
    let keys = SlotKeys::derive(&token.slot_secret);
    let probe = Relay::bind_packet(&token, Slot::A, 1, [0; 16], &keys);
    let Outcome::Reply { len, .. } = sessions.handle(r.now, T0, from, None, &probe, &mut r.reply)
    else {
        panic!("expected a CHALLENGE");
    };
    let Ok(Packet::Challenge(c)) = wire::parse(&r.reply[..len]) else {
        panic!("expected a CHALLENGE");
    };
    let bind = Relay::bind_packet(&token, Slot::A, 2, *c.cookie(), &keys);
    let outcome = sessions.handle(r.now, T0, from, None, &bind, &mut r.reply);
    assert!(matches!(outcome, Outcome::Reply { .. }));
    // By the time the BIND-ACK is handed back, the observer knows the session.
    let opened = SessionEvent::Bound {
        session: sid,
        slots: [Some(from), None],
        locals: [None, None],
        budgets: [
            Some(session::SlotBudget {
                rate: SessionLimits::default().default_session_rate,
                set_at: r.now,
                fresh: true,
                previous_rate: SessionLimits::default().default_session_rate,
            }),
            None,
        ],
    };
    assert_eq!(*lock(&recorder.seen), [(opened, true)]);
    let later = r.now + Duration::from_secs(3600);
    assert_eq!(sessions.reap(later, T0, &mut Vec::new()), 1);
    assert_eq!(
        *lock(&recorder.seen),
        [(opened, true), (SessionEvent::Closed(sid), true)]
    );
}
