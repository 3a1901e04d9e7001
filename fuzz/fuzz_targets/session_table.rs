//! A stateful fuzz target for the relay's session logic: sequences of datagrams from a few
//! addresses and steps of time, driven through `ferry_relay::session::check` and
//! `SessionTable::handle` (and `SessionTable::reap`) the way a relay shard drives them.
//!
//! The input is a list of operations (BIND, REBIND, DATA, KEEPALIVE, CLOSE made with genuine
//! tokens and slot keys, with or without a valid cookie and a valid proof; raw bytes; time
//! steps; reaping). A model of the bindings follows the table's events, and after every
//! operation the target checks, besides that nothing panics:
//! - every slot is bound to one address, and no address holds both slots of a session;
//! - the table holds exactly the sessions and bindings its events told of, its sessions
//!   opened minus closed is the number it holds, and there are never more than
//!   `max_sessions`;
//! - each source IP is charged exactly the slots bound at it;
//! - DATA is forwarded only from a bound address, and only to the other slot's bound address;
//!   DATA from a bound address with the other slot bound is forwarded or dropped over budget;
//!   anything else is dropped as unbound;
//! - a KEEPALIVE is echoed to its sender if and only if it is bound to the session;
//! - replies go to the sender, except a verified CLOSE's notice, which goes to the other
//!   slot's bound address; a BIND-ACK to the sender means it is bound there now, and a
//!   peer-present notice goes to the other slot's bound address;
//! - a health probe binds nothing;
//! - reaping notifies only addresses that were bound, with CLOSEs;
//! - counters never decrease.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_core::cidr::limit_key;
use ferry_core::keys::{GatewaySigningKey, RelayPublicKey, RelayStaticKey};
use ferry_core::proof::{CookieJar, SlotKeys};
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter, TokenVerifier, VerifierConfig};
use ferry_core::wire::{
    self, BindFields, CloseFields, CloseReason, MAX_DATAGRAM, Packet, RebindFields, Slot,
};
use ferry_relay::limits::{IpLimits, IpTable};
use ferry_relay::session::{
    Counters, DropReason, Notice, Outcome, SessionEvent, SessionLimits, SessionTable, check,
};
use libfuzzer_sys::fuzz_target;

const RELAY_ID: u64 = 77;
const KID: u32 = 3;
const T0: UnixTime = UnixTime(1_900_000_000);
const SESSIONS: [u64; 3] = [0x5e55_0001, 0x5e55_0002, 0x5e55_0003];
const ADDRS: [&str; 6] = [
    "198.18.0.1:1000",
    "198.18.0.1:1001",
    "198.18.0.2:2000",
    "198.18.0.3:3000",
    "[2001:db8::1]:4000",
    "[2001:db8::2]:4000",
];
const IP_LIMITS: IpLimits = IpLimits {
    bind_rate: 50.0,
    bind_burst: 8,
    max_bindings: 3,
    capacity: 64,
    ipv6_prefix_len: 64,
};

/// A token of the pool, with what it is for.
struct PoolToken {
    minted: MintedToken,
    keys: SlotKeys,
}

/// What every run shares: the relay's keys and a pool of genuine tokens (minting draws
/// random ids, so it is done once; the operations name tokens by index).
struct Keys {
    verifier: TokenVerifier,
    cookies: CookieJar,
    /// For each session and slot: a long token, a short one (30 s) with a small rate, and a
    /// second long one (a renewal); then one health-probe token.
    pool: Vec<PoolToken>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        let relay = RelayStaticKey::from_bytes(&[5; 32]);
        let relay_public: RelayPublicKey = relay.public();
        let gateway = GatewaySigningKey::from_seed_bytes(&[6; 32]).expect("fixed seed");
        let minter = TokenMinter::new(KID, gateway);
        let mut verifier =
            TokenVerifier::new(VerifierConfig::new(RELAY_ID), relay).expect("default config");
        verifier.add_trusted_key(KID, minter.public());
        let mut pool = Vec::new();
        let mut add = |minted: MintedToken| {
            let keys = SlotKeys::derive(&minted.slot_secret);
            pool.push(PoolToken { minted, keys });
        };
        for session_id in SESSIONS {
            for slot in [Slot::A, Slot::B] {
                for (lifetime, rate) in [(600, 0), (30, 2_000), (600, 0)] {
                    let input = ClaimsInput {
                        slot,
                        relay_id: RELAY_ID,
                        session_id,
                        not_before: T0,
                        expires: T0.saturating_add(lifetime),
                        rate_bytes_per_sec: rate,
                    };
                    add(minter.mint(&rng, &input, &relay_public).expect("minting"));
                }
            }
        }
        let probe = ClaimsInput {
            slot: Slot::A,
            relay_id: RELAY_ID,
            session_id: SESSIONS[0],
            not_before: T0,
            expires: T0.saturating_add(600),
            rate_bytes_per_sec: 0,
        };
        add(minter
            .mint_probe(&rng, &probe, &relay_public)
            .expect("minting"));
        Keys {
            verifier,
            cookies: CookieJar::new([8; 32]),
            pool,
        }
    })
}

/// Where each session's slots are bound, as the table's events said.
type Model = HashMap<u64, [Option<SocketAddr>; 2]>;

/// Reads operation bytes.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
}

/// The run: the table, what drives it, and the model.
struct Run {
    table: SessionTable,
    ips: IpTable,
    start: Instant,
    /// Time since the start: `now` is `start` plus it, the wall clock `T0` plus it.
    elapsed: Duration,
    now: Instant,
    wall: UnixTime,
    reply: Vec<u8>,
    model: Model,
    counters: Vec<u64>,
}

fn addr(b: u8) -> SocketAddr {
    ADDRS[usize::from(b) % ADDRS.len()]
        .parse()
        .expect("fixed address")
}

fn slot_index(slot: Slot) -> usize {
    usize::from(slot.as_u8())
}

/// Every counter, in a fixed order, to check that none goes down.
fn flat(c: &Counters) -> Vec<u64> {
    let mut v = vec![
        c.forwarded,
        c.forwarded_bytes,
        c.malformed,
        c.unexpected_type,
        c.data_unbound,
        c.keepalive_unbound,
        c.bad_close,
        c.rate_limited,
        c.bind_rate_limited,
        c.challenges,
        c.probes,
        c.binds_accepted,
        c.rebinds_accepted,
        c.keepalives,
        c.closed,
        c.reaped,
        c.sessions_opened,
        c.sessions_closed,
    ];
    v.extend(c.malformed_by_rule);
    v.extend(c.binds_rejected);
    v.extend(c.notices);
    v
}

impl Run {
    fn new() -> Self {
        let limits = SessionLimits {
            idle_timeout: Duration::from_secs(10),
            max_sessions: 2,
            replay_cache_capacity: 8,
            default_session_rate: 3_000,
            max_session_rate: 1_000_000,
        };
        let skew = keys().verifier.config().max_skew_secs;
        let start = Instant::now();
        Self {
            table: SessionTable::new(limits, skew),
            ips: IpTable::new(IP_LIMITS),
            start,
            elapsed: Duration::ZERO,
            now: start,
            wall: T0,
            reply: vec![0; MAX_DATAGRAM],
            model: Model::new(),
            counters: flat(&Counters::default()),
        }
    }

    /// The slot `from` is bound to in `sid`, per the model.
    fn bound_slot(&self, sid: u64, from: SocketAddr) -> Option<usize> {
        self.model
            .get(&sid)
            .and_then(|s| s.iter().position(|a| *a == Some(from)))
    }

    fn bound_at(&self, sid: u64, slot: usize) -> Option<SocketAddr> {
        self.model.get(&sid).and_then(|s| s[slot])
    }

    /// `check`, then the table, as a shard does it.
    fn deliver(&mut self, from: SocketAddr, datagram: &[u8]) -> Outcome {
        let keys = keys();
        let (now, ips) = (self.now, &mut self.ips);
        match check(
            &keys.cookies,
            || &keys.verifier,
            |ip| ips.try_bind_attempt(ip, now).is_ok(),
            self.wall,
            from,
            None,
            datagram,
            &mut self.reply,
        ) {
            Ok(input) => self
                .table
                .handle(now, self.wall, input, &mut self.ips, &mut self.reply),
            Err(answered) => answered.outcome,
        }
    }

    /// Applies the table's events to the model.
    fn take_events(&mut self) {
        for event in self.table.take_events() {
            match event {
                SessionEvent::Bound { session, slots, .. } => {
                    assert!(
                        slots.iter().any(Option::is_some),
                        "a Bound event with no slot"
                    );
                    self.model.insert(session, slots);
                }
                SessionEvent::Closed(session) => {
                    assert!(
                        self.model.remove(&session).is_some(),
                        "closed a session never opened"
                    );
                }
            }
        }
    }

    /// The invariants that hold between operations.
    fn check_state(&mut self) {
        assert_eq!(self.table.session_count(), self.model.len());
        assert!(self.model.len() <= 2, "more sessions than max_sessions");
        let mut bindings = 0;
        let mut per_ip: HashMap<IpAddr, u32> = HashMap::new();
        for (&sid, slots) in &self.model {
            assert!(self.table.holds(sid));
            if let [Some(a), Some(b)] = slots {
                assert_ne!(a, b, "one address holds both slots of {sid:x}");
            }
            for a in slots.iter().flatten() {
                bindings += 1;
                *per_ip.entry(limit_key(a.ip(), 64)).or_default() += 1;
            }
        }
        assert_eq!(self.table.binding_count(), bindings);
        for a in ADDRS {
            let ip = addr_ip(a);
            let want = per_ip.get(&limit_key(ip, 64)).copied().unwrap_or(0);
            assert_eq!(self.ips.bindings(ip), want, "slots charged to {ip}");
            assert!(want <= IP_LIMITS.max_bindings);
        }
        let c = self.table.counters();
        assert_eq!(
            c.sessions_opened - c.sessions_closed,
            self.model.len() as u64,
            "sessions opened minus closed"
        );
        let now = flat(c);
        for (i, (new, old)) in now.iter().zip(&self.counters).enumerate() {
            assert!(new >= old, "counter {i} went down from {old} to {new}");
        }
        self.counters = now;
    }

    /// The packet of a reply of `len` bytes at `offset` in the reply buffer.
    fn reply_packet(&self, offset: usize, len: usize) -> Packet<'_> {
        wire::parse(&self.reply[offset..offset + len]).expect("the relay's reply parses")
    }

    /// Checks what a BIND or REBIND for `slot` of `sid` from `from` got.
    fn check_bind_outcome(&self, outcome: Outcome, from: SocketAddr, sid: u64, slot: usize) {
        match outcome {
            Outcome::Reply { to, len, .. } => {
                assert_eq!(to, from, "a BIND answered elsewhere");
                if let Packet::BindAck(ack) = self.reply_packet(0, len) {
                    assert_eq!(ack.session_id(), sid);
                    assert_eq!(slot_index(ack.slot()), slot);
                    self.assert_acked(sid, slot, from);
                }
            }
            Outcome::ReplyAndNotify {
                to,
                len,
                notify,
                notice_len,
                ..
            } => {
                assert_eq!(to, from, "a BIND answered elsewhere");
                assert!(matches!(self.reply_packet(0, len), Packet::BindAck(_)));
                self.assert_acked(sid, slot, from);
                assert_eq!(
                    Some(notify),
                    self.bound_at(sid, 1 - slot),
                    "notice went astray"
                );
                let Packet::BindAck(notice) = self.reply_packet(len, notice_len) else {
                    panic!("the peer-present notice is not a BIND-ACK");
                };
                assert!(notice.peer_present());
            }
            Outcome::Drop(reason) => assert!(
                matches!(reason, DropReason::BindRateLimited | DropReason::Malformed),
                "a BIND dropped as {reason:?}"
            ),
            Outcome::Consumed => {}
            Outcome::Forward { .. } => panic!("a BIND forwarded"),
        }
    }

    /// A BIND-ACK went to `from` for `slot` of `sid`: it is bound there now (unless it was a
    /// health probe, which the caller checks apart).
    fn assert_acked(&self, sid: u64, slot: usize, from: SocketAddr) {
        assert_eq!(
            self.bound_at(sid, slot),
            Some(from),
            "acknowledged a binding the table does not hold"
        );
    }

    fn op(&mut self, ops: &mut Ops<'_>) -> Option<()> {
        let keys = keys();
        let code = ops.byte()?;
        let before = self.model.clone();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match code % 9 {
            // BIND: address, token, sequence, flags (valid cookie, bad proof, other slot).
            0 | 1 => {
                let (from, t, seq, flags) =
                    (addr(ops.byte()?), ops.byte()?, ops.byte()?, ops.byte()?);
                let token = &keys.pool[usize::from(t) % keys.pool.len()];
                let claims = &token.minted.claims;
                let sid = claims.session_id;
                let slot = match flags & 4 {
                    0 => claims.slot,
                    _ => claims.slot.other(),
                };
                let cookie = match flags & 1 {
                    0 => [0; 16],
                    _ => keys.cookies.issue(self.wall, sid, slot.as_u8(), from),
                };
                let fields = BindFields {
                    slot,
                    bind_seq: u64::from(seq),
                    cookie,
                    token: &token.minted.bytes,
                };
                let n = wire::encode_bind(&mut buf, sid, &fields, |m| {
                    let mut mac = token.keys.peer.mac(m);
                    mac[0] ^= flags & 2;
                    mac
                })
                .expect("encoding a BIND");
                let probe = claims.probe;
                let outcome = self.deliver(from, &buf[..n]);
                self.take_events();
                if probe {
                    assert_eq!(self.model, before, "a health probe bound something");
                } else {
                    self.check_bind_outcome(outcome, from, sid, slot_index(slot));
                }
            }
            // REBIND: address, token (its session, slot and keys), sequence, flags.
            2 => {
                let (from, t, seq, flags) =
                    (addr(ops.byte()?), ops.byte()?, ops.byte()?, ops.byte()?);
                let token = &keys.pool[usize::from(t) % keys.pool.len()];
                let (sid, slot) = (token.minted.claims.session_id, token.minted.claims.slot);
                let cookie = match flags & 1 {
                    0 => [0; 16],
                    _ => keys.cookies.issue(self.wall, sid, slot.as_u8(), from),
                };
                let fields = RebindFields {
                    slot,
                    bind_seq: u64::from(seq),
                    cookie,
                };
                let n = wire::encode_rebind(&mut buf, sid, &fields, |m| {
                    let mut mac = token.keys.peer.mac(m);
                    mac[0] ^= flags & 2;
                    mac
                })
                .expect("encoding a REBIND");
                let outcome = self.deliver(from, &buf[..n]);
                self.take_events();
                self.check_bind_outcome(outcome, from, sid, slot_index(slot));
                if before != self.model {
                    // Only the REBIND's slot moved, and only to its sender.
                    let (old, new) = (before.get(&sid), self.model.get(&sid));
                    let (Some(old), Some(new)) = (old, new) else {
                        panic!("a REBIND opened or closed a session");
                    };
                    assert_eq!(new[slot_index(slot)], Some(from));
                    assert_eq!(new[1 - slot_index(slot)], old[1 - slot_index(slot)]);
                    assert!(
                        old[slot_index(slot)].is_some(),
                        "a REBIND bound a free slot"
                    );
                }
            }
            // DATA: address, session, length.
            3 | 4 => {
                let (from, s, len) = (addr(ops.byte()?), ops.byte()?, ops.byte()?);
                let sid = SESSIONS[usize::from(s) % SESSIONS.len()];
                let payload = vec![0xda; 1 + usize::from(len) * 5];
                let n = wire::encode_data(&mut buf, sid, &payload).expect("encoding DATA");
                let outcome = self.deliver(from, &buf[..n]);
                self.take_events();
                assert_eq!(self.model, before, "DATA changed a binding");
                let route = self
                    .bound_slot(sid, from)
                    .and_then(|i| self.bound_at(sid, 1 - i));
                match (outcome, route) {
                    (Outcome::Forward { to, .. }, Some(other)) => assert_eq!(to, other),
                    (Outcome::Forward { to, .. }, None) => {
                        panic!("DATA from {from} forwarded to {to} without a binding")
                    }
                    (Outcome::Drop(DropReason::RateLimited), Some(_)) => {}
                    (Outcome::Drop(DropReason::DataUnbound), None) => {}
                    (other, route) => panic!("DATA from {from} (route {route:?}): {other:?}"),
                }
            }
            // KEEPALIVE: address, session.
            5 => {
                let (from, s) = (addr(ops.byte()?), ops.byte()?);
                let sid = SESSIONS[usize::from(s) % SESSIONS.len()];
                let n = wire::encode_keepalive(&mut buf, sid).expect("encoding a KEEPALIVE");
                let outcome = self.deliver(from, &buf[..n]);
                self.take_events();
                assert_eq!(self.model, before, "a KEEPALIVE changed a binding");
                match (outcome, self.bound_slot(sid, from)) {
                    (Outcome::Reply { to, len, .. }, Some(_)) => {
                        assert_eq!(to, from);
                        assert!(matches!(self.reply_packet(0, len), Packet::Keepalive(_)));
                    }
                    (Outcome::Drop(DropReason::KeepaliveUnbound), None) => {}
                    (other, bound) => panic!("KEEPALIVE from {from} (bound {bound:?}): {other:?}"),
                }
            }
            // CLOSE: address, token (session, slot, keys), sequence, flags (bad proof).
            6 => {
                let (from, t, seq, flags) =
                    (addr(ops.byte()?), ops.byte()?, ops.byte()?, ops.byte()?);
                let token = &keys.pool[usize::from(t) % keys.pool.len()];
                let (sid, slot) = (token.minted.claims.session_id, token.minted.claims.slot);
                let fields = CloseFields {
                    slot,
                    reason: CloseReason::PeerClosed,
                    seq: u64::from(seq),
                };
                let n = wire::encode_close(&mut buf, sid, &fields, |m| {
                    let mut mac = token.keys.peer.mac(m);
                    mac[0] ^= flags & 2;
                    mac
                })
                .expect("encoding a CLOSE");
                let outcome = self.deliver(from, &buf[..n]);
                self.take_events();
                let closed = before.contains_key(&sid) && !self.model.contains_key(&sid);
                let mut expected = before.clone();
                if closed {
                    expected.remove(&sid);
                }
                assert_eq!(self.model, expected, "a CLOSE changed another session");
                match outcome {
                    Outcome::Reply { to, len, .. } => {
                        assert!(closed, "a CLOSE answered without closing");
                        let other = before.get(&sid).and_then(|s| s[1 - slot_index(slot)]);
                        assert_eq!(Some(to), other, "the CLOSE notice went astray");
                        assert!(matches!(self.reply_packet(0, len), Packet::Close(_)));
                    }
                    Outcome::Consumed => assert!(closed),
                    Outcome::Drop(DropReason::BadClose) => assert!(!closed),
                    other => panic!("CLOSE: {other:?}"),
                }
            }
            // Raw bytes from an address: length, then the bytes.
            7 => {
                let from = addr(ops.byte()?);
                let len = usize::from(ops.byte()?).min(ops.0.len());
                let (datagram, rest) = ops.0.split_at(len);
                ops.0 = rest;
                let outcome = self.deliver(from, datagram);
                self.take_events();
                if let Outcome::Forward { to, .. } = outcome {
                    let sid = wire::parse(datagram)
                        .expect("forwarded DATA parses")
                        .session_id();
                    let route = self
                        .bound_slot(sid, from)
                        .and_then(|i| self.bound_at(sid, 1 - i));
                    assert_eq!(Some(to), route, "raw DATA forwarded astray");
                }
            }
            // Time passes (250 ms steps, or minutes), then the reaper runs when asked.
            _ => {
                let step = ops.byte()?;
                let elapsed = match step {
                    0..=199 => Duration::from_millis(250 * u64::from(step)),
                    _ => Duration::from_secs(60 * u64::from(step - 199)),
                };
                self.elapsed += elapsed;
                self.now = self.start + self.elapsed;
                self.wall = T0.saturating_add(self.elapsed.as_secs());
                if step & 1 == 1 {
                    let mut notices: Vec<Notice> = Vec::new();
                    self.table
                        .reap(self.now, self.wall, &mut self.ips, &mut notices);
                    self.take_events();
                    for notice in &notices {
                        let was_bound = before.values().any(|s| s.contains(&Some(notice.to)));
                        assert!(
                            was_bound,
                            "reaping notified {} which was not bound",
                            notice.to
                        );
                        let packet = wire::parse(&notice.datagram).expect("a notice parses");
                        assert!(matches!(packet, Packet::Close(_)));
                    }
                    for (sid, slots) in &self.model {
                        let old = before.get(sid).expect("reaping opened a session");
                        for (new, old) in slots.iter().zip(old) {
                            assert!(new.is_none() || new == old, "reaping moved a slot");
                        }
                    }
                }
            }
        }
        Some(())
    }
}

fn addr_ip(a: &str) -> IpAddr {
    a.parse::<SocketAddr>().expect("fixed address").ip()
}

fuzz_target!(|data: &[u8]| {
    let mut run = Run::new();
    let mut ops = Ops(data);
    while run.op(&mut ops).is_some() {
        run.check_state();
    }
});
