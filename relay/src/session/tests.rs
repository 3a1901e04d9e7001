use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_core::keys::{GatewaySigningKey, RelayPublicKey, RelayStaticKey};
use ferry_core::proof::CookieJar;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter, TokenVerifier, VerifierConfig};
use ferry_core::wire::{BindAck, Close};
use ferry_core::wire::{BindFields, CloseFields, MAX_DATAGRAM, Packet, RebindFields};
use ring::rand::SystemRandom;

use super::*;
use crate::limits::{IpLimits, IpTable};

const RELAY_ID: u64 = 77;
const SID: u64 = 0xfeed_f00d;
const T0: UnixTime = UnixTime(1_900_000_000);

fn v4(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)), port)
}

/// A relay with one trusted gateway, and the means to mint tokens for it: one table, driven
/// the way `crate::shards::Sessions` drives each shard, without the locks.
struct Fixture {
    table: SessionTable,
    verifier: TokenVerifier,
    cookies: CookieJar,
    ips: IpTable,
    /// What `check` answered by itself.
    early: Counters,
    minter: TokenMinter,
    relay_public: RelayPublicKey,
    now: Instant,
    reply: Vec<u8>,
    /// What the reaper told peers, oldest first.
    notices: Vec<Notice>,
    /// The relay address every datagram is sent to, as a wildcard socket would tell it
    /// (`None`: a socket on a specific address).
    local: Option<IpAddr>,
    rng: SystemRandom,
}

impl Fixture {
    fn new(limits: SessionLimits) -> Self {
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).unwrap();
        let relay_public = relay.public();
        let minter = TokenMinter::new(3, GatewaySigningKey::generate(&rng).unwrap());
        let mut verifier = TokenVerifier::new(VerifierConfig::new(RELAY_ID), relay).unwrap();
        verifier.add_trusted_key(3, minter.public());
        let cookies = CookieJar::generate(&rng).unwrap();
        Self {
            table: SessionTable::new(limits, verifier.config().max_skew_secs),
            verifier,
            cookies,
            ips: IpTable::new(IpLimits::default()),
            early: Counters::default(),
            minter,
            relay_public,
            now: Instant::now(),
            reply: vec![0; MAX_DATAGRAM],
            notices: Vec::new(),
            local: None,
            rng,
        }
    }

    fn mint(&self, sid: u64, slot: Slot) -> MintedToken {
        let input = ClaimsInput {
            slot,
            relay_id: RELAY_ID,
            session_id: sid,
            not_before: T0,
            expires: T0.saturating_add(600),
            rate_bytes_per_sec: 0,
        };
        self.minter
            .mint(&self.rng, &input, &self.relay_public)
            .unwrap()
    }

    fn send(&mut self, from: SocketAddr, datagram: &[u8]) -> Outcome {
        self.send_at(T0, from, datagram)
    }

    /// Handles `datagram` at wall-clock time `wall`: `check`, then the table.
    fn send_at(&mut self, wall: UnixTime, from: SocketAddr, datagram: &[u8]) -> Outcome {
        let (now, ips) = (self.now, &mut self.ips);
        let checked = check(
            &self.cookies,
            || &self.verifier,
            |ip| ips.try_bind_attempt(ip, now).is_ok(),
            wall,
            from,
            self.local,
            datagram,
            &mut self.reply,
        );
        match checked {
            Ok(input) => self
                .table
                .handle(now, wall, input, &mut self.ips, &mut self.reply),
            Err(answered) => {
                self.early.tally(answered.tally);
                answered.outcome
            }
        }
    }

    /// The counters of the table and of `check`'s own answers.
    fn counters(&self) -> Counters {
        let mut total = self.table.counters().clone();
        total.add(&self.early);
        total
    }

    fn reap(&mut self, now: Instant, wall: UnixTime) -> usize {
        self.table.reap(now, wall, &mut self.ips, &mut self.notices)
    }

    /// The reply to the sender (without the notice to the other peer, if one went too).
    fn reply_packet(&self, outcome: Outcome) -> Packet<'_> {
        let (Outcome::Reply { len, .. } | Outcome::ReplyAndNotify { len, .. }) = outcome else {
            panic!("expected a reply, got {outcome:?}");
        };
        wire::parse(&self.reply[..len]).unwrap()
    }

    /// A BIND for `token` with `cookie`, proved with the token's slot secret.
    fn bind_packet(&self, token: &MintedToken, slot: Slot, seq: u64, cookie: [u8; 16]) -> Vec<u8> {
        let keys = SlotKeys::derive(&token.slot_secret);
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

    /// The cookie the relay hands `from` in a CHALLENGE.
    fn cookie_for(&mut self, from: SocketAddr, token: &MintedToken, slot: Slot) -> [u8; 16] {
        let probe = self.bind_packet(token, slot, 1, [0; 16]);
        let outcome = self.send(from, &probe);
        match self.reply_packet(outcome) {
            Packet::Challenge(c) => *c.cookie(),
            other => panic!("expected CHALLENGE, got {other:?}"),
        }
    }

    /// Runs the whole BIND exchange and returns the relay's final answer.
    fn bind(&mut self, from: SocketAddr, token: &MintedToken, slot: Slot, seq: u64) -> Outcome {
        let cookie = self.cookie_for(from, token, slot);
        let bind = self.bind_packet(token, slot, seq, cookie);
        self.send(from, &bind)
    }

    fn expect_ack(&mut self, outcome: Outcome) -> bool {
        match self.reply_packet(outcome) {
            Packet::BindAck(ack) => ack.peer_present(),
            other => panic!("expected BIND-ACK, got {other:?}"),
        }
    }

    fn expect_reject(&mut self, outcome: Outcome) -> (RejectReason, bool) {
        match self.reply_packet(outcome) {
            Packet::Reject(r) => (r.reason(), r.authenticated()),
            other => panic!("expected REJECT, got {other:?}"),
        }
    }

    fn data(&self, sid: u64) -> Vec<u8> {
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_data(&mut buf, sid, b"ciphertext the relay cannot read").unwrap();
        buf.truncate(n);
        buf
    }

    /// Both slots of session `SID` bound, at `a` and `b`.
    fn bound_pair(&mut self, a: SocketAddr, b: SocketAddr) -> (MintedToken, MintedToken) {
        let ta = self.mint(SID, Slot::A);
        let tb = self.mint(SID, Slot::B);
        let outcome = self.bind(a, &ta, Slot::A, 10);
        assert!(!self.expect_ack(outcome), "B is not bound yet");
        let outcome = self.bind(b, &tb, Slot::B, 10);
        assert!(self.expect_ack(outcome), "A is bound");
        (ta, tb)
    }
}

#[test]
fn two_peers_bind_and_data_is_forwarded_both_ways() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    f.bound_pair(a, b);
    let data = f.data(SID);
    assert_eq!(f.send(a, &data), Outcome::Forward { to: b, src: None });
    assert_eq!(f.send(b, &data), Outcome::Forward { to: a, src: None });
    assert_eq!(f.counters().forwarded, 2);
    assert_eq!(f.counters().binds_accepted, 2);
    assert_eq!(f.counters().challenges, 2);
}

#[test]
fn ipv6_peers_bind_and_forward() {
    let mut f = Fixture::new(SessionLimits::default());
    let a = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        1000,
    );
    let b = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
        2000,
    );
    f.bound_pair(a, b);
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Forward { to: b, src: None }
    );
}

#[test]
fn a_challenge_is_smaller_than_the_bind_that_caused_it() {
    let mut f = Fixture::new(SessionLimits::default());
    let token = f.mint(SID, Slot::A);
    let bind = f.bind_packet(&token, Slot::A, 1, [0; 16]);
    let Outcome::Reply { len, .. } = f.send(v4(1, 1), &bind) else {
        panic!("expected a CHALLENGE");
    };
    assert!(len < bind.len(), "{len} >= {}", bind.len());
    assert_eq!(f.table.session_count(), 0, "no state before a valid cookie");
}

#[test]
fn data_from_strangers_and_half_bound_sessions_is_dropped() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, mallory) = (v4(1, 1000), v4(66, 6666));
    let data = f.data(SID);
    assert_eq!(f.send(a, &data), Outcome::Drop(DropReason::DataUnbound));
    let ta = f.mint(SID, Slot::A);
    let outcome = f.bind(a, &ta, Slot::A, 1);
    f.expect_ack(outcome);
    assert_eq!(
        f.send(a, &data),
        Outcome::Drop(DropReason::DataUnbound),
        "B not bound"
    );
    let outcome = f.bind(v4(2, 2000), &f.mint(SID, Slot::B), Slot::B, 1);
    f.expect_ack(outcome);
    assert_eq!(
        f.send(mallory, &data),
        Outcome::Drop(DropReason::DataUnbound)
    );
    assert_eq!(f.counters().data_unbound, 3);
    assert_eq!(f.counters().forwarded, 0);
}

#[test]
fn a_stolen_token_without_the_slot_secret_is_rejected() {
    let mut f = Fixture::new(SessionLimits::default());
    let mallory = v4(66, 6666);
    let token = f.mint(SID, Slot::A);
    let cookie = f.cookie_for(mallory, &token, Slot::A);
    let fields = BindFields {
        slot: Slot::A,
        bind_seq: 5,
        cookie,
        token: &token.bytes,
    };
    let mut buf = vec![0; MAX_DATAGRAM];
    let n = wire::encode_bind(&mut buf, SID, &fields, |_| [0xab; 16]).unwrap();
    let outcome = f.send(mallory, &buf[..n]);
    assert_eq!(f.expect_reject(outcome), (RejectReason::BadProof, false));
    assert_eq!(f.table.session_count(), 0);
}

#[test]
fn a_replayed_bind_from_another_address_gets_only_a_challenge() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, mallory) = (v4(1, 1000), v4(66, 6666));
    let token = f.mint(SID, Slot::A);
    let cookie = f.cookie_for(a, &token, Slot::A);
    let bind = f.bind_packet(&token, Slot::A, 7, cookie);
    let outcome = f.send(a, &bind);
    f.expect_ack(outcome);
    // The captured BIND, replayed verbatim from elsewhere: its cookie is a's.
    let outcome = f.send(mallory, &bind);
    assert!(matches!(f.reply_packet(outcome), Packet::Challenge(_)));
    // Replayed from a's own address it changes nothing: the same binding is re-acknowledged.
    let outcome = f.send(a, &bind);
    f.expect_ack(outcome);
    assert_eq!(f.table.session_count(), 1);
}

#[test]
fn the_same_token_from_another_place_is_a_replay() {
    let mut f = Fixture::new(SessionLimits::default());
    let token = f.mint(SID, Slot::A);
    let outcome = f.bind(v4(1, 1000), &token, Slot::A, 7);
    f.expect_ack(outcome);
    // Whoever holds the secret must use REBIND to move; a second BIND is refused.
    let outcome = f.bind(v4(9, 9000), &token, Slot::A, 8);
    assert_eq!(f.expect_reject(outcome), (RejectReason::Replayed, true));
    // And an older sequence number from the bound address is refused too.
    let outcome = f.bind(v4(1, 1000), &token, Slot::A, 6);
    assert_eq!(f.expect_reject(outcome), (RejectReason::Replayed, true));
}

#[test]
fn a_slot_held_by_another_token_is_full() {
    let mut f = Fixture::new(SessionLimits::default());
    let first = f.mint(SID, Slot::A);
    let second = f.mint(SID, Slot::A);
    let outcome = f.bind(v4(1, 1000), &first, Slot::A, 1);
    f.expect_ack(outcome);
    let outcome = f.bind(v4(2, 2000), &second, Slot::A, 1);
    assert_eq!(f.expect_reject(outcome), (RejectReason::SessionFull, true));
    // From the holder's own address a fresh token renews the binding.
    let outcome = f.bind(v4(1, 1000), &second, Slot::A, 2);
    f.expect_ack(outcome);
}

#[test]
fn bad_tokens_are_rejected_with_their_reason() {
    let mut f = Fixture::new(SessionLimits::default());
    let a = v4(1, 1000);
    // A token for slot B presented in a BIND for slot A.
    let token_b = f.mint(SID, Slot::B);
    let outcome = f.bind(a, &token_b, Slot::A, 1);
    assert_eq!(
        f.expect_reject(outcome),
        (RejectReason::WrongSession, false)
    );
    // A token for another session presented under SID: rebuild the BIND under SID.
    let other = f.mint(SID + 1, Slot::A);
    let cookie = f.cookie_for(a, &f.mint(SID, Slot::A), Slot::A);
    let keys = SlotKeys::derive(&other.slot_secret);
    let fields = BindFields {
        slot: Slot::A,
        bind_seq: 2,
        cookie,
        token: &other.bytes,
    };
    let mut buf = vec![0; MAX_DATAGRAM];
    let n = wire::encode_bind(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
    let outcome = f.send(a, &buf[..n]);
    assert_eq!(
        f.expect_reject(outcome),
        (RejectReason::WrongSession, false)
    );
    // An expired token.
    let token = f.mint(SID, Slot::A);
    let cookie = f.cookie_for(a, &token, Slot::A);
    let bind = f.bind_packet(&token, Slot::A, 3, cookie);
    let late = T0.saturating_add(600 + 31);
    let outcome = f.send_at(late, a, &bind);
    // The cookie window has moved on by then, so the relay first asks for a new cookie.
    assert!(matches!(f.reply_packet(outcome), Packet::Challenge(_)));
    let Packet::Challenge(c) = f.reply_packet(outcome) else {
        unreachable!()
    };
    let cookie = *c.cookie();
    let bind = f.bind_packet(&token, Slot::A, 4, cookie);
    let outcome = f.send_at(late, a, &bind);
    assert_eq!(
        f.expect_reject(outcome),
        (RejectReason::TokenExpired, false)
    );
    let expired = RejectReason::TokenExpired.as_u8() as usize;
    assert_eq!(f.counters().binds_rejected[expired], 1);
}

#[test]
fn rebind_moves_the_slot_only_with_proof() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b, a2) = (v4(1, 1000), v4(2, 2000), v4(3, 3000));
    let (ta, _) = f.bound_pair(a, b);
    let keys = SlotKeys::derive(&ta.slot_secret);
    let rebind = |cookie, seq, good: bool| {
        let fields = RebindFields {
            slot: Slot::A,
            bind_seq: seq,
            cookie,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_rebind(&mut buf, SID, &fields, |m| {
            if good { keys.peer.mac(m) } else { [0; 16] }
        })
        .unwrap();
        buf.truncate(n);
        buf
    };
    let outcome = f.send(a2, &rebind([0; 16], 11, true));
    let Packet::Challenge(c) = f.reply_packet(outcome) else {
        panic!("expected CHALLENGE");
    };
    let cookie = *c.cookie();
    let outcome = f.send(a2, &rebind(cookie, 11, false));
    assert_eq!(f.expect_reject(outcome), (RejectReason::BadProof, false));
    let outcome = f.send(a2, &rebind(cookie, 11, true));
    f.expect_ack(outcome);
    let outcome = f.send(a2, &rebind(cookie, 11, true));
    assert_eq!(f.expect_reject(outcome), (RejectReason::Replayed, true));
    let data = f.data(SID);
    assert_eq!(f.send(a2, &data), Outcome::Forward { to: b, src: None });
    assert_eq!(f.send(b, &data), Outcome::Forward { to: a2, src: None });
    assert_eq!(f.send(a, &data), Outcome::Drop(DropReason::DataUnbound));
    assert_eq!(f.counters().rebinds_accepted, 1);
}

#[test]
fn rebind_of_an_unknown_session_is_rejected() {
    let mut f = Fixture::new(SessionLimits::default());
    let from = v4(3, 3000);
    let token = f.mint(SID, Slot::A);
    let cookie = f.cookie_for(from, &token, Slot::A);
    let fields = RebindFields {
        slot: Slot::A,
        bind_seq: 1,
        cookie,
    };
    let mut buf = vec![0; MAX_DATAGRAM];
    let n = wire::encode_rebind(&mut buf, SID, &fields, |_| [0; 16]).unwrap();
    let outcome = f.send(from, &buf[..n]);
    assert_eq!(
        f.expect_reject(outcome),
        (RejectReason::UnknownSession, false)
    );
}

#[test]
fn keepalives_are_echoed_only_to_bound_sources() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    f.bound_pair(a, b);
    let mut buf = vec![0; MAX_DATAGRAM];
    let n = wire::encode_keepalive(&mut buf, SID).unwrap();
    let outcome = f.send(a, &buf[..n]);
    assert_eq!(
        outcome,
        Outcome::Reply {
            to: a,
            src: None,
            len: n
        }
    );
    assert_eq!(
        f.send(v4(66, 1), &buf[..n]),
        Outcome::Drop(DropReason::KeepaliveUnbound)
    );
}

#[test]
fn a_verified_close_ends_the_session_and_tells_the_other_peer() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    let (ta, tb) = f.bound_pair(a, b);
    let close = |keys: &SlotKeys, seq| {
        let mut buf = vec![0; MAX_DATAGRAM];
        let fields = CloseFields {
            slot: Slot::A,
            reason: CloseReason::PeerClosed,
            seq,
        };
        let n = wire::encode_close(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
        buf.truncate(n);
        buf
    };
    let wrong = SlotKeys::derive(&tb.slot_secret);
    assert_eq!(
        f.send(a, &close(&wrong, 99)),
        Outcome::Drop(DropReason::BadClose)
    );
    let keys = SlotKeys::derive(&ta.slot_secret);
    assert_eq!(
        f.send(a, &close(&keys, 10)),
        Outcome::Drop(DropReason::BadClose),
        "stale seq"
    );
    let outcome = f.send(a, &close(&keys, 11));
    let Outcome::Reply { to, len, .. } = outcome else {
        panic!("expected a CLOSE for b, got {outcome:?}");
    };
    assert_eq!(to, b);
    let Ok(Packet::Close(c)) = wire::parse(&f.reply[..len]) else {
        panic!("expected CLOSE");
    };
    let b_keys = SlotKeys::derive(&tb.slot_secret);
    assert!(
        b_keys.relay.verify(c.mac_input(), c.mac()),
        "relay CLOSE is authenticated"
    );
    assert_eq!(c.reason(), CloseReason::PeerClosed);
    assert_eq!(f.counters().notices(NoticeKind::PeerClosed), 1);
    assert_eq!(f.table.session_count(), 0);
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Drop(DropReason::DataUnbound)
    );
}

#[test]
fn idle_and_expired_bindings_are_reaped() {
    let limits = SessionLimits {
        idle_timeout: Duration::from_secs(60),
        ..SessionLimits::default()
    };
    let mut f = Fixture::new(limits);
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    f.bound_pair(a, b);
    assert_eq!(f.reap(f.now + Duration::from_secs(59), T0), 0);
    // A keeps talking, B falls silent.
    f.now += Duration::from_secs(59);
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Forward { to: b, src: None }
    );
    assert_eq!(f.reap(f.now + Duration::from_secs(1), T0), 1);
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Drop(DropReason::DataUnbound)
    );
    assert_eq!(f.table.session_count(), 1);
    // The token expires (600 s lifetime + 30 s skew) although A is active.
    assert_eq!(f.reap(f.now, T0.saturating_add(630)), 1);
    assert_eq!(f.table.session_count(), 0);
    assert_eq!(f.counters().reaped, 2);
}

#[test]
fn the_session_cap_sheds_new_sessions() {
    let limits = SessionLimits {
        max_sessions: 1,
        ..SessionLimits::default()
    };
    let mut f = Fixture::new(limits);
    let outcome = f.bind(v4(1, 1), &f.mint(SID, Slot::A), Slot::A, 1);
    f.expect_ack(outcome);
    let outcome = f.bind(v4(2, 2), &f.mint(SID + 1, Slot::A), Slot::A, 1);
    assert_eq!(f.expect_reject(outcome), (RejectReason::Overloaded, true));
    // The other slot of an existing session is not a new session.
    let outcome = f.bind(v4(3, 3), &f.mint(SID, Slot::B), Slot::B, 1);
    f.expect_ack(outcome);
}

#[test]
fn garbage_and_relay_only_types_are_dropped_and_counted() {
    let mut f = Fixture::new(SessionLimits::default());
    assert_eq!(
        f.send(v4(1, 1), b"\x00\x01garbage"),
        Outcome::Drop(DropReason::Malformed)
    );
    let mut buf = vec![0; MAX_DATAGRAM];
    let fields = wire::ChallengeFields {
        bind_seq: 1,
        cookie: [7; 16],
    };
    let n = wire::encode_challenge(&mut buf, SID, &fields).unwrap();
    assert_eq!(
        f.send(v4(1, 1), &buf[..n]),
        Outcome::Drop(DropReason::UnexpectedType)
    );
    assert_eq!(f.counters().malformed, 1);
    assert_eq!(f.counters().unexpected_type, 1);
    // Counted by the rule broken: b"\x00\x01garbage" is 9 bytes, too short for a header.
    let too_short = HeaderError::TooShort.as_index();
    assert_eq!(f.counters().malformed_by_rule[too_short], 1);
    let mut bad_magic = buf[..n].to_vec();
    bad_magic[0] ^= 0xff;
    f.send(v4(1, 1), &bad_magic);
    let by_rule = f.counters().malformed_by_rule;
    assert_eq!(by_rule[HeaderError::BadMagic.as_index()], 1);
    assert_eq!(by_rule.iter().sum::<u64>(), f.counters().malformed);
}

#[test]
fn data_over_the_slot_budget_is_dropped_and_the_other_direction_is_not() {
    let limits = SessionLimits {
        default_session_rate: 10_000,
        ..SessionLimits::default()
    };
    let mut f = Fixture::new(limits);
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    f.bound_pair(a, b);
    let mut big = vec![0; MAX_DATAGRAM];
    let n = wire::encode_data(&mut big, SID, &[9; 1000]).unwrap();
    big.truncate(n);
    // A burst of 10,000 bytes: nine 1016-byte datagrams fit, the tenth does not.
    let forwarded = (0..10)
        .filter(|_| f.send(a, &big) == Outcome::Forward { to: b, src: None })
        .count();
    assert_eq!(forwarded, 9);
    assert_eq!(f.counters().rate_limited, 1);
    // B's budget is its own.
    assert_eq!(f.send(b, &big), Outcome::Forward { to: a, src: None });
    // A second later A may send again.
    f.now += Duration::from_secs(1);
    assert_eq!(f.send(a, &big), Outcome::Forward { to: b, src: None });
}

#[test]
fn a_token_rate_claim_is_capped_by_the_relay_and_reload_recaps_it() {
    let limits = SessionLimits {
        default_session_rate: 1_000_000,
        max_session_rate: 2_000_000,
        ..SessionLimits::default()
    };
    assert_eq!(limits.slot_rate(0), 1_000_000);
    assert_eq!(limits.slot_rate(500), 500);
    assert_eq!(limits.slot_rate(9_000_000), 2_000_000);
    let mut f = Fixture::new(limits.clone());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    f.bound_pair(a, b);
    let data = f.data(SID);
    let fits = |f: &mut Fixture| {
        (0..100_000)
            .take_while(|_| f.send(a, &data) == Outcome::Forward { to: b, src: None })
            .count()
    };
    let before = fits(&mut f);
    assert_eq!(before as u64, 1_000_000 / data.len() as u64);
    // Cap every slot at 3000 bytes/s: after a refill only a few datagrams fit.
    let tight = SessionLimits {
        default_session_rate: 3000,
        max_session_rate: 3000,
        ..limits
    };
    f.table.set_limits(tight, f.now);
    f.now += Duration::from_secs(10);
    assert_eq!(fits(&mut f) as u64, 3000 / data.len() as u64);
}

#[test]
fn binds_over_the_per_ip_rate_are_dropped_after_the_cookie() {
    let mut f = Fixture::new(SessionLimits::default());
    let ips = IpLimits {
        bind_rate: 1.0,
        bind_burst: 2,
        ..IpLimits::default()
    };
    f.ips = IpTable::new(ips);
    let a = v4(1, 1000);
    let token = f.mint(SID, Slot::A);
    // Cookie-less BINDs are answered with CHALLENGEs and not charged to the IP.
    for _ in 0..5 {
        f.cookie_for(a, &token, Slot::A);
    }
    let cookie = f.cookie_for(a, &token, Slot::A);
    let bind = f.bind_packet(&token, Slot::A, 1, cookie);
    let outcome = f.send(a, &bind);
    f.expect_ack(outcome);
    let outcome = f.send(a, &bind);
    f.expect_ack(outcome);
    assert_eq!(f.send(a, &bind), Outcome::Drop(DropReason::BindRateLimited));
    assert_eq!(f.counters().bind_rate_limited, 1);
}

#[test]
fn an_ip_may_hold_only_so_many_slots() {
    let mut f = Fixture::new(SessionLimits::default());
    let ips = IpLimits {
        max_bindings: 2,
        ..IpLimits::default()
    };
    f.ips = IpTable::new(ips);
    for (k, port) in [1000u16, 1001].into_iter().enumerate() {
        let token = f.mint(SID + k as u64, Slot::A);
        let outcome = f.bind(v4(1, port), &token, Slot::A, 1);
        f.expect_ack(outcome);
    }
    let third = f.mint(SID + 2, Slot::A);
    let outcome = f.bind(v4(1, 1002), &third, Slot::A, 1);
    assert_eq!(f.expect_reject(outcome), (RejectReason::Overloaded, true));
    // Another IP is not affected, and reaping gives the slots back.
    let outcome = f.bind(v4(2, 1000), &third, Slot::A, 1);
    f.expect_ack(outcome);
    f.reap(f.now + Duration::from_secs(3600), T0);
    assert_eq!(f.ips.bindings(v4(1, 0).ip()), 0);
    assert_eq!(f.counters().sessions_opened, 3);
    assert_eq!(f.counters().sessions_closed, 3);
}

#[test]
fn removing_a_gateway_key_refuses_its_new_tokens_but_keeps_bound_sessions() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    f.bound_pair(a, b);
    f.verifier.remove_trusted_key(3);
    let token = f.mint(SID + 1, Slot::A);
    let outcome = f.bind(v4(3, 3000), &token, Slot::A, 1);
    assert_eq!(
        f.expect_reject(outcome),
        (RejectReason::TokenInvalid, false)
    );
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Forward { to: b, src: None }
    );
}

/// A REBIND of `token`'s slot from `from`, through the CHALLENGE, proved with its secret.
fn rebind(f: &mut Fixture, from: SocketAddr, token: &MintedToken, slot: Slot, seq: u64) -> Outcome {
    let cookie = f.cookie_for(from, token, slot);
    let keys = SlotKeys::derive(&token.slot_secret);
    let fields = RebindFields {
        slot,
        bind_seq: seq,
        cookie,
    };
    let mut buf = vec![0; MAX_DATAGRAM];
    let n = wire::encode_rebind(&mut buf, token.claims.session_id, &fields, |m| {
        keys.peer.mac(m)
    })
    .unwrap();
    f.send(from, &buf[..n])
}

#[test]
fn one_address_may_not_hold_both_slots_of_a_session() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    let ta = f.mint(SID, Slot::A);
    let tb = f.mint(SID, Slot::B);
    let outcome = f.bind(a, &ta, Slot::A, 1);
    f.expect_ack(outcome);
    // B's BIND from A's address (ip and port) is refused, authenticated with B's keys.
    let b_keys = SlotKeys::derive(&tb.slot_secret);
    let session_full = |f: &Fixture, outcome| match f.reply_packet(outcome) {
        Packet::Reject(r) => {
            assert_eq!(r.reason(), RejectReason::SessionFull);
            assert!(r.authenticated());
            assert!(
                b_keys.relay.verify(r.mac_input(), r.mac()),
                "MAC with B's keys"
            );
        }
        other => panic!("expected REJECT, got {other:?}"),
    };
    let outcome = f.bind(a, &tb, Slot::B, 1);
    session_full(&f, outcome);
    assert_eq!(f.table.binding_count(), 1);
    // From its own address B binds with the same token (the refusal did not spend it).
    let outcome = f.bind(b, &tb, Slot::B, 2);
    assert!(f.expect_ack(outcome));
    // B's REBIND to A's address is refused the same way, and nothing moves.
    let outcome = rebind(&mut f, a, &tb, Slot::B, 3);
    session_full(&f, outcome);
    let data = f.data(SID);
    assert_eq!(f.send(a, &data), Outcome::Forward { to: b, src: None });
    assert_eq!(f.send(b, &data), Outcome::Forward { to: a, src: None });
    let full = RejectReason::SessionFull.as_u8() as usize;
    assert_eq!(f.counters().binds_rejected[full], 2);
    // Another port of A's host is another address: B may move there.
    let outcome = rebind(&mut f, v4(1, 1001), &tb, Slot::B, 4);
    assert!(f.expect_ack(outcome));
    assert_eq!(
        f.send(a, &data),
        Outcome::Forward {
            to: v4(1, 1001),
            src: None
        }
    );
}

#[test]
fn ipv6_sources_in_one_prefix_share_one_bind_budget_and_one_binding_count() {
    let mut f = Fixture::new(SessionLimits::default());
    f.ips = IpTable::new(IpLimits {
        bind_rate: 1.0,
        bind_burst: 3,
        max_bindings: 2,
        ..IpLimits::default()
    });
    let v6 = |net: u16, host: u16| {
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, net, 0, 0, 0, host);
        SocketAddr::new(IpAddr::V6(ip), 1000)
    };
    // Two hosts of 2001:db8:0:1::/64 bind a slot each: both slots count for the /64.
    for host in [1, 2] {
        let token = f.mint(SID + u64::from(host), Slot::A);
        let outcome = f.bind(v6(1, host), &token, Slot::A, 1);
        f.expect_ack(outcome);
    }
    assert_eq!(f.ips.bindings(v6(1, 0xffff).ip()), 2);
    // A third host of it is over the /64's binding count...
    let token = f.mint(SID + 3, Slot::A);
    let outcome = f.bind(v6(1, 3), &token, Slot::A, 1);
    assert_eq!(f.expect_reject(outcome), (RejectReason::Overloaded, true));
    // ...and that was the third attempt of the /64's burst: a fourth host is over its rate.
    let cookie = f.cookie_for(v6(1, 4), &token, Slot::A);
    let bind = f.bind_packet(&token, Slot::A, 1, cookie);
    assert_eq!(
        f.send(v6(1, 4), &bind),
        Outcome::Drop(DropReason::BindRateLimited)
    );
    // The next /64 has a budget and a count of its own.
    let outcome = f.bind(v6(2, 1), &token, Slot::A, 1);
    f.expect_ack(outcome);
    assert_eq!(f.ips.len(), 2);
    assert_eq!(f.counters().bind_rate_limited, 1);
}

#[test]
fn sessions_opened_and_forgotten_are_queued_as_events_in_order() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    assert!(!f.table.has_events());
    let (ta, _) = f.bound_pair(a, b);
    assert_eq!(
        placed_events(&mut f.table),
        [bound(SID, Some(a), None), bound(SID, Some(a), Some(b))]
    );
    let keys = SlotKeys::derive(&ta.slot_secret);
    let mut buf = vec![0; MAX_DATAGRAM];
    let fields = CloseFields {
        slot: Slot::A,
        reason: CloseReason::PeerClosed,
        seq: 11,
    };
    let n = wire::encode_close(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
    f.send(a, &buf[..n]);
    let token = f.mint(SID + 1, Slot::A);
    let outcome = f.bind(a, &token, Slot::A, 1);
    f.expect_ack(outcome);
    f.reap(f.now + Duration::from_secs(3600), T0);
    assert_eq!(
        placed_events(&mut f.table),
        [
            SessionEvent::Closed(SID),
            bound(SID + 1, Some(a), None),
            SessionEvent::Closed(SID + 1)
        ]
    );
    assert!(!f.table.has_events());
}

/// `event` without its budgets, whose times the tests do not pin down: the session and where
/// its slots are bound.
fn placed(event: SessionEvent) -> SessionEvent {
    match event {
        SessionEvent::Bound {
            session,
            slots,
            locals,
            ..
        } => SessionEvent::Bound {
            session,
            slots,
            locals,
            budgets: [None, None],
        },
        closed => closed,
    }
}

/// [`placed`] of every event `table` queued.
fn placed_events(table: &mut SessionTable) -> Vec<SessionEvent> {
    table.take_events().into_iter().map(placed).collect()
}

/// The event for slots bound at `a` and `b`, as [`placed`] shows it.
fn bound(session: u64, a: Option<SocketAddr>, b: Option<SocketAddr>) -> SessionEvent {
    SessionEvent::Bound {
        session,
        slots: [a, b],
        locals: [None, None],
        budgets: [None, None],
    }
}

#[test]
fn a_rebind_and_a_reaped_slot_tell_the_guard_where_the_slots_are_now() {
    let limits = SessionLimits {
        idle_timeout: Duration::from_secs(60),
        ..SessionLimits::default()
    };
    let mut f = Fixture::new(limits);
    let (a, b, a2) = (v4(1, 1000), v4(2, 2000), v4(3, 3000));
    let (ta, _) = f.bound_pair(a, b);
    f.table.take_events();
    // A refused REBIND (bad cookie) changes nothing; an accepted one moves slot A.
    let outcome = rebind(&mut f, a2, &ta, Slot::A, 11);
    f.expect_ack(outcome);
    assert_eq!(placed_events(&mut f.table), [bound(SID, Some(a2), Some(b))]);
    let outcome = rebind(&mut f, a2, &ta, Slot::A, 11);
    f.expect_reject(outcome);
    assert!(!f.table.has_events());
    // A keeps talking, B falls silent and is reaped: only A's address is left.
    f.now += Duration::from_secs(59);
    assert_eq!(
        f.send(a2, &f.data(SID)),
        Outcome::Forward { to: b, src: None }
    );
    assert_eq!(f.reap(f.now + Duration::from_secs(1), T0), 1);
    assert_eq!(placed_events(&mut f.table), [bound(SID, Some(a2), None)]);
    // DATA and a reap that unbinds nothing make no event.
    f.send(a2, &f.data(SID));
    f.reap(f.now, T0);
    assert!(!f.table.has_events());
}

/// The CLOSE of `notice`, checked to be for `to`, under `token`'s relay key (and so not under
/// any other slot's).
fn close_notice_for<'a>(notice: &'a Notice, to: SocketAddr, token: &MintedToken) -> Close<'a> {
    assert_eq!(notice.to, to);
    let Ok(Packet::Close(close)) = wire::parse(&notice.datagram) else {
        panic!("expected a CLOSE, got {:?}", notice.datagram);
    };
    let keys = SlotKeys::derive(&token.slot_secret);
    assert!(keys.relay.verify(close.mac_input(), close.mac()));
    close
}

#[test]
fn reaped_peers_are_told_why_with_an_authenticated_close() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    let (ta, tb) = f.bound_pair(a, b);
    assert_eq!(f.reap(f.now + Duration::from_secs(59), T0), 0);
    assert!(f.notices.is_empty(), "nothing to tell before a slot goes");
    // A keeps talking, B falls silent for the idle timeout.
    f.now += Duration::from_secs(59);
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Forward { to: b, src: None }
    );
    assert_eq!(f.reap(f.now + Duration::from_secs(1), T0), 1);
    let [idle] = f.notices.as_slice() else {
        panic!("expected one notice, got {:?}", f.notices);
    };
    let close = close_notice_for(idle, b, &tb);
    assert_eq!(close.session_id(), SID);
    assert_eq!(close.slot(), Slot::B);
    assert_eq!(close.reason(), CloseReason::Idle);
    assert_eq!(close.seq(), 10, "B's last accepted sequence number");
    let a_keys = SlotKeys::derive(&ta.slot_secret);
    assert!(
        !a_keys.relay.verify(close.mac_input(), close.mac()),
        "only B's key verifies B's notice"
    );
    // A's token runs out (600 s lifetime + 30 s skew) although A is active.
    f.notices.clear();
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Drop(DropReason::DataUnbound)
    );
    assert_eq!(f.reap(f.now, T0.saturating_add(629)), 0);
    assert_eq!(f.reap(f.now, T0.saturating_add(630)), 1);
    let [expired] = f.notices.as_slice() else {
        panic!("expected one notice, got {:?}", f.notices);
    };
    let close = close_notice_for(expired, a, &ta);
    assert_eq!(close.slot(), Slot::A);
    assert_eq!(close.reason(), CloseReason::Expired);
    assert_eq!(close.seq(), 10);
    let counters = f.counters();
    assert_eq!(counters.notices(NoticeKind::Idle), 1);
    assert_eq!(counters.notices(NoticeKind::Expired), 1);
    assert_eq!(counters.notices(NoticeKind::PeerClosed), 0);
    assert_eq!(counters.reaped, 2);
}

#[test]
fn an_expired_and_idle_slot_is_told_it_expired() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    let (ta, tb) = f.bound_pair(a, b);
    assert_eq!(
        f.reap(f.now + Duration::from_secs(3600), T0.saturating_add(700)),
        2
    );
    let [first, second] = f.notices.as_slice() else {
        panic!("expected two notices, got {:?}", f.notices);
    };
    for (notice, to, token) in [(first, a, &ta), (second, b, &tb)] {
        assert_eq!(
            close_notice_for(notice, to, token).reason(),
            CloseReason::Expired
        );
    }
    assert_eq!(f.table.session_count(), 0);
}

/// The BIND-ACK in `bytes`, checked to verify under `token`'s relay key.
fn ack_under<'a>(bytes: &'a [u8], token: &MintedToken) -> BindAck<'a> {
    let Ok(Packet::BindAck(ack)) = wire::parse(bytes) else {
        panic!("expected a BIND-ACK, got {bytes:?}");
    };
    let keys = SlotKeys::derive(&token.slot_secret);
    assert!(keys.relay.verify(ack.mac_input(), ack.mac()));
    ack
}

#[test]
fn the_bind_that_completes_a_session_notifies_the_other_peer() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b, a2) = (v4(1, 1000), v4(2, 2000), v4(3, 3000));
    let (ta, tb) = (f.mint(SID, Slot::A), f.mint(SID, Slot::B));
    let outcome = f.bind(a, &ta, Slot::A, 10);
    assert!(
        matches!(outcome, Outcome::Reply { to, .. } if to == a),
        "nobody to tell yet: {outcome:?}"
    );
    let cookie = f.cookie_for(b, &tb, Slot::B);
    let bind = f.bind_packet(&tb, Slot::B, 20, cookie);
    let outcome = f.send(b, &bind);
    let Outcome::ReplyAndNotify {
        to,
        len,
        notify,
        notice_len,
        ..
    } = outcome
    else {
        panic!("expected an ACK and a notice, got {outcome:?}");
    };
    assert_eq!((to, notify), (b, a));
    let ack = ack_under(&f.reply[..len], &tb);
    assert_eq!(
        (ack.slot(), ack.peer_present(), ack.bind_seq()),
        (Slot::B, true, 20)
    );
    // The notice is A's own BIND-ACK: A's slot, A's last number and `exp`, A's key only.
    let notice = ack_under(&f.reply[len..len + notice_len], &ta);
    assert_eq!(notice.session_id(), SID);
    assert_eq!(notice.slot(), Slot::A);
    assert!(notice.peer_present());
    assert_eq!(notice.bind_seq(), 10);
    assert_eq!(notice.expires_at(), T0.saturating_add(600).as_secs());
    assert_eq!(notice.idle_timeout_secs(), 60);
    let b_keys = SlotKeys::derive(&tb.slot_secret);
    assert!(!b_keys.relay.verify(notice.mac_input(), notice.mac()));
    // Both answers together are smaller than the BIND that caused them.
    assert!(len + notice_len < bind.len(), "{len} + {notice_len}");
    assert_eq!(f.counters().notices(NoticeKind::PeerPresent), 1);

    // A retransmitted BIND, a renewal and a REBIND change nothing A does not know.
    let outcome = f.send(b, &bind);
    assert!(matches!(outcome, Outcome::Reply { .. }), "{outcome:?}");
    let renewal = f.mint(SID, Slot::B);
    let outcome = f.bind(b, &renewal, Slot::B, 21);
    assert!(matches!(outcome, Outcome::Reply { .. }), "{outcome:?}");
    assert!(f.expect_ack(outcome));
    let keys = SlotKeys::derive(&ta.slot_secret);
    let rebind = |cookie| {
        let fields = RebindFields {
            slot: Slot::A,
            bind_seq: 11,
            cookie,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_rebind(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
        buf.truncate(n);
        buf
    };
    let outcome = f.send(a2, &rebind([0; 16]));
    let Packet::Challenge(c) = f.reply_packet(outcome) else {
        panic!("expected CHALLENGE");
    };
    let outcome = f.send(a2, &rebind(*c.cookie()));
    assert!(
        matches!(outcome, Outcome::Reply { to, .. } if to == a2),
        "{outcome:?}"
    );
    assert!(f.expect_ack(outcome));
    assert_eq!(f.counters().notices(NoticeKind::PeerPresent), 1);
}

#[test]
fn a_slot_bound_again_after_a_reap_is_news_to_the_other_peer() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    let (ta, _) = f.bound_pair(a, b);
    f.now += Duration::from_secs(59);
    assert_eq!(
        f.send(a, &f.data(SID)),
        Outcome::Forward { to: b, src: None }
    );
    assert_eq!(f.reap(f.now + Duration::from_secs(1), T0), 1);
    // B comes back with a fresh token: A hears of it.
    let fresh = f.mint(SID, Slot::B);
    let outcome = f.bind(b, &fresh, Slot::B, 30);
    let Outcome::ReplyAndNotify {
        len,
        notify,
        notice_len,
        ..
    } = outcome
    else {
        panic!("expected an ACK and a notice, got {outcome:?}");
    };
    assert_eq!(notify, a);
    assert!(ack_under(&f.reply[len..len + notice_len], &ta).peer_present());
    assert_eq!(f.counters().notices(NoticeKind::PeerPresent), 2);
}

#[test]
fn a_peer_close_with_a_reason_is_malformed() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    let (ta, _) = f.bound_pair(a, b);
    let keys = SlotKeys::derive(&ta.slot_secret);
    for reason in [CloseReason::Expired, CloseReason::Idle] {
        let fields = CloseFields {
            slot: Slot::A,
            reason,
            seq: 11,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_close(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
        assert_eq!(f.send(a, &buf[..n]), Outcome::Drop(DropReason::Malformed));
    }
    assert_eq!(f.table.session_count(), 1, "the session stays");
    assert_eq!(f.counters().malformed_by_rule[HeaderError::COUNT], 2);
}

#[test]
fn notice_kinds_index_their_counters_in_order() {
    let mut counters = Counters::default();
    for (i, kind) in NoticeKind::ALL.into_iter().enumerate() {
        for _ in 0..=i {
            counters.count_notice(kind);
        }
    }
    assert_eq!(counters.notices, [1, 2, 3, 4]);
    for (i, kind) in NoticeKind::ALL.into_iter().enumerate() {
        assert_eq!(counters.notices(kind), i as u64 + 1, "{}", kind.name());
    }
    for reason in CloseReason::ALL {
        assert_eq!(NoticeKind::of_close(reason).name(), reason.name());
    }
}

/// A gateway's health probe (a BIND with a probe token) is answered with a BIND-ACK whose MAC
/// only the holder of the relay's private key can compute, counted as a probe, and binds
/// nothing: no session, no bind counted, DATA from the prober is not forwarded. A probe token
/// sealed to another relay's key gets an unauthenticated REJECT like any token it cannot open.
#[test]
fn a_health_probe_is_answered_and_binds_nothing() {
    let mut f = Fixture::new(SessionLimits::default());
    let input = ClaimsInput {
        slot: Slot::A,
        relay_id: RELAY_ID,
        session_id: SID,
        not_before: T0,
        expires: T0.saturating_add(60),
        rate_bytes_per_sec: 0,
    };
    let probe = f
        .minter
        .mint_probe(&f.rng, &input, &f.relay_public)
        .unwrap();
    let prober = v4(9, 9000);
    let outcome = f.bind(prober, &probe, Slot::A, 5);
    let Outcome::Reply { to, len, .. } = outcome else {
        panic!("expected a reply, got {outcome:?}");
    };
    assert_eq!(to, prober);
    let Ok(Packet::BindAck(ack)) = wire::parse(&f.reply[..len]) else {
        panic!("expected a BIND-ACK");
    };
    let keys = SlotKeys::derive(&probe.slot_secret);
    assert!(keys.relay.verify(ack.mac_input(), ack.mac()));
    assert_eq!((ack.bind_seq(), ack.peer_present()), (5, false));
    let counters = f.counters();
    assert_eq!((counters.probes, counters.binds_accepted), (1, 0));
    assert_eq!(counters.sessions_opened, 0);
    let data = f.data(SID);
    assert_eq!(
        f.send(prober, &data),
        Outcome::Drop(DropReason::DataUnbound)
    );
    // Sealed to a key this relay does not hold.
    let other = RelayStaticKey::generate(&f.rng).unwrap().public();
    let wrong = f.minter.mint_probe(&f.rng, &input, &other).unwrap();
    let outcome = f.bind(prober, &wrong, Slot::A, 6);
    let (_, authenticated) = f.expect_reject(outcome);
    assert!(!authenticated);
    assert_eq!(f.counters().probes, 1);
}

/// The differential test of the XDP fast path's decision against the table's: the guard's
/// maps as the relay's `SessionFilter` writes them from the table's events, and the program's
/// verdict as `ferry_common::xdp` computes it (the same functions the program runs).
mod fast_path {
    use std::collections::HashMap;

    use ferry_common::xdp::{Counter, FastSlot, FastState, SessionEntry};
    use proptest::prelude::*;

    use super::*;
    use crate::xdp::{KernelClock, RelaySources, entry};

    /// The guard's `SESSIONS` and `FAST_STATE` maps, kept as the relay keeps them.
    struct Maps {
        sessions: HashMap<u64, SessionEntry>,
        state: HashMap<u64, FastState>,
        sources: RelaySources,
        clock: KernelClock,
    }

    /// What the fast path does with one DATA.
    #[derive(Debug, PartialEq)]
    enum Fast {
        /// Sends it to this slot's address.
        Forward(usize),
        /// Charged it, then left it to the relay (another family).
        Charged,
        /// Dropped it: over budget.
        OverBudget,
        /// Left it to the relay uncharged, for this reason.
        Pass(Option<Counter>),
    }

    impl Maps {
        fn apply(&mut self, events: Vec<SessionEvent>) {
            for event in events {
                match event {
                    SessionEvent::Bound {
                        session,
                        slots,
                        locals,
                        budgets,
                    } => {
                        self.state.entry(session).or_default();
                        let e = entry(slots, locals, budgets, &self.sources, &self.clock);
                        self.sessions.insert(session, e);
                    }
                    SessionEvent::Closed(session) => {
                        self.sessions.remove(&session);
                        self.state.remove(&session);
                    }
                }
            }
        }

        /// The program's decision for DATA of `len` bytes from `from` at `now`.
        fn data(&mut self, sid: u64, from: SocketAddr, len: usize, now: Instant) -> Fast {
            let Some(entry) = self.sessions.get(&sid) else {
                return Fast::Pass(None);
            };
            let addr = match from.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            let (i, j) = match entry.fast_route(&addr, from.port()) {
                Ok(route) => route,
                Err(reason) => return Fast::Pass(Some(reason)),
            };
            let Some(state) = self.state.get_mut(&sid) else {
                return Fast::Pass(Some(Counter::FastNotEligible));
            };
            let slot = &mut state.slots[i];
            let sender = &entry.slots[i];
            let start = FastSlot::start(slot.tat, slot.epoch, &slot.charged_under, sender);
            let now_ns = sender.charge_time(self.clock.ns(now));
            let Some(tat) = sender.budget.admit(start, now_ns, len as u64) else {
                return Fast::OverBudget;
            };
            slot.tat = tat;
            slot.charged_under = sender.budget;
            slot.epoch = sender.budget_since;
            match entry.fast_sendable(i, j) {
                Ok(()) => Fast::Forward(j),
                Err(_) => Fast::Charged,
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// BIND slot `slot` of session `sid` from address `addr` (a fresh token).
        Bind {
            sid: usize,
            slot: usize,
            addr: usize,
        },
        /// BIND both slots of session `sid`, from addresses of its own.
        Pair { sid: usize },
        /// REBIND slot `slot` of session `sid` to address `addr`.
        Rebind {
            sid: usize,
            slot: usize,
            addr: usize,
        },
        /// A verified CLOSE from slot `slot` of session `sid`.
        Close { sid: usize, slot: usize },
        /// DATA of `len` bytes for session `sid`, `gap_us` later: from where slot `who` was
        /// last sent to bind (`who` 0 or 1, most of the time), else from address `who - 2`.
        Data {
            sid: usize,
            who: usize,
            len: usize,
            gap_us: u64,
        },
        /// The reaper, after `secs` of silence (idle slots go), or past every token's expiry.
        Reap { secs: u64, expired: bool },
        /// A reload to the `rate`th rate, after a pause that fills every budget.
        Limits { rate: usize },
    }

    /// Rates whose per-byte cost in the program's units (2⁻¹⁰ ns) is a whole number, so the
    /// program's meter and the relay's bucket round alike.
    /// Small enough that DATA every few milliseconds runs out of budget.
    const RATES: [u64; 4] = [2_000, 4_000, 8_000, 16_000];
    const SIDS: [u64; 3] = [0x5101, 0x5202, 0x5303];

    /// A pause after which every slot's budget is full, at every rate in [`RATES`]: its
    /// burst over its rate, for the rate where that is longest. The smallest rate's burst is
    /// two of the largest datagrams (2,944 bytes), which takes 1.47 s to refill at 2,000
    /// bytes a second.
    const FILL_EVERY_BUDGET: Duration = Duration::from_millis(1_500);

    #[test]
    fn the_pause_before_a_reload_fills_every_budget() {
        for rate in RATES {
            let fill =
                Duration::from_secs_f64(SessionLimits::slot_burst(rate) as f64 / rate as f64);
            assert!(fill <= FILL_EVERY_BUDGET, "{rate} B/s refills in {fill:?}");
        }
    }

    fn addr(i: usize) -> SocketAddr {
        match i {
            6 => SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9)),
                4009,
            ),
            i => v4(10 + i as u8, 4000 + i as u16),
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0..3usize, 0..2usize, 0..7usize).prop_map(|(sid, slot, addr)| Op::Bind { sid, slot, addr }),
            2 => (0..3usize).prop_map(|sid| Op::Pair { sid }),
            1 => (0..3usize, 0..2usize, 0..7usize).prop_map(|(sid, slot, addr)| Op::Rebind { sid, slot, addr }),
            1 => (0..3usize, 0..2usize).prop_map(|(sid, slot)| Op::Close { sid, slot }),
            16 => (0..3usize, 0..8usize, 1..1400usize, 0..500u64).prop_map(|(sid, who, len, gap_us)| {
                // Mostly from where a slot is bound: three in eight from each, one in four
                // from elsewhere.
                let who = match who { 0..=2 => 0, 3..=5 => 1, n => n - 4 };
                Op::Data { sid, who, len, gap_us }
            }),
            1 => (0..70u64, 0..4u8).prop_map(|(secs, e)| Op::Reap { secs, expired: e == 0 }),
            1 => (0..RATES.len()).prop_map(|rate| Op::Limits { rate }),
        ]
    }

    fn limits(rate: u64) -> SessionLimits {
        SessionLimits {
            default_session_rate: rate,
            max_session_rate: rate,
            ..SessionLimits::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// For every DATA, the fast path's verdict is the table's: it forwards exactly what
        /// the table forwards (to the same address), drops as over budget exactly what the
        /// table drops as rate limited, and leaves to the table everything else.
        #[test]
        fn the_fast_path_decides_every_data_as_the_table_does(
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let mut f = Fixture::new(limits(RATES[0]));
            let mut maps = Maps {
                sessions: HashMap::new(),
                state: HashMap::new(),
                sources: RelaySources::of(&[
                    v4(100, 7000),
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)), 7000),
                ]),
                clock: KernelClock::at(f.now, 1 << 40),
            };
            let mut tokens: HashMap<(usize, usize), MintedToken> = HashMap::new();
            // Where each slot was last sent to bind from, whether the table took it or not.
            let mut placed: HashMap<(usize, usize), usize> = HashMap::new();
            let mut seq = 100u64;
            let wall = T0;
            for op in ops {
                seq += 1;
                let binds = match op {
                    Op::Bind { sid, slot, addr } => vec![(sid, slot, addr)],
                    Op::Pair { sid } => vec![(sid, 0, 7 + 2 * sid), (sid, 1, 8 + 2 * sid)],
                    _ => Vec::new(),
                };
                for (sid, slot, a) in binds {
                    let s = [Slot::A, Slot::B][slot];
                    let token = f.mint(SIDS[sid], s);
                    let cookie = f.cookie_for(addr(a), &token, s);
                    let bind = f.bind_packet(&token, s, seq, cookie);
                    f.send_at(wall, addr(a), &bind);
                    tokens.insert((sid, slot), token);
                    placed.insert((sid, slot), a);
                    maps.apply(f.table.take_events());
                }
                match op {
                    Op::Bind { .. } | Op::Pair { .. } => {}
                    Op::Rebind { sid, slot, addr: a } => {
                        if let Some(token) = tokens.get(&(sid, slot)) {
                            rebind(&mut f, addr(a), token, [Slot::A, Slot::B][slot], seq);
                            placed.insert((sid, slot), a);
                        }
                    }
                    Op::Close { sid, slot } => {
                        if let Some(token) = tokens.get(&(sid, slot)) {
                            let keys = SlotKeys::derive(&token.slot_secret);
                            let fields = CloseFields {
                                slot: [Slot::A, Slot::B][slot],
                                reason: CloseReason::PeerClosed,
                                seq,
                            };
                            let mut buf = vec![0; MAX_DATAGRAM];
                            let n = wire::encode_close(&mut buf, SIDS[sid], &fields, |m| {
                                keys.peer.mac(m)
                            })
                            .unwrap();
                            // From wherever: a CLOSE is proved by its MAC.
                            f.send_at(wall, addr(0), &buf[..n]);
                        }
                    }
                    Op::Data { sid, who, len, gap_us } => {
                        f.now += Duration::from_micros(gap_us);
                        let from = match who {
                            0 | 1 => placed.get(&(sid, who)).map_or(v4(99, 1), |a| addr(*a)),
                            n => addr(n - 2),
                        };
                        let mut buf = vec![0; MAX_DATAGRAM];
                        let body = vec![0x42; len];
                        let n = wire::encode_data(&mut buf, SIDS[sid], &body).unwrap();
                        let fast = maps.data(SIDS[sid], from, n, f.now);
                        let table = f.send_at(wall, from, &buf[..n]);
                        match (&fast, table) {
                            (Fast::Forward(j), Outcome::Forward { to, .. }) => {
                                let e = maps.sessions[&SIDS[sid]];
                                let want = match to.ip() {
                                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                                    IpAddr::V6(v6) => v6.octets(),
                                };
                                prop_assert_eq!(e.slots[*j].addr, want);
                                prop_assert_eq!(e.slots[*j].port, to.port());
                            }
                            (Fast::Charged, Outcome::Forward { .. }) => {}
                            (Fast::OverBudget, Outcome::Drop(DropReason::RateLimited)) => {}
                            (Fast::Pass(None | Some(Counter::FastPeerUnbound)),
                             Outcome::Drop(DropReason::DataUnbound)) => {}
                            (fast, table) => prop_assert!(
                                false,
                                "DATA {len} B for session {sid} from {from}: fast path {fast:?}, table {table:?}"
                            ),
                        }
                    }
                    Op::Reap { secs, expired } => {
                        f.now += Duration::from_secs(secs);
                        // Past every token's expiry for this pass only: later BINDs mint
                        // tokens valid at T0 again.
                        let at = if expired { T0.saturating_add(10_000) } else { T0 };
                        let now = f.now;
                        f.reap(now, at);
                    }
                    Op::Limits { rate } => {
                        // After a pause that fills every budget, where the relay's bucket
                        // and the program's meter agree exactly. (Mid-burst, the meter
                        // carries over in whole bytes, rounding down: it may then refuse a
                        // fraction of a byte the relay would admit, never the reverse.)
                        f.now += FILL_EVERY_BUDGET;
                        let now = f.now;
                        f.table.set_limits(limits(RATES[rate]), now);
                    }
                }
                maps.apply(f.table.take_events());
            }
        }
    }
}

/// The source address of every datagram `outcome` sends: (to, from) pairs.
fn sources(outcome: Outcome) -> Vec<(SocketAddr, Option<IpAddr>)> {
    match outcome {
        Outcome::Forward { to, src } | Outcome::Reply { to, src, .. } => vec![(to, src)],
        Outcome::ReplyAndNotify {
            to,
            src,
            notify,
            notify_src,
            ..
        } => vec![(to, src), (notify, notify_src)],
        Outcome::Consumed | Outcome::Drop(_) => Vec::new(),
    }
}

/// On a wildcard listen address each peer may send to another relay address; everything the
/// relay sends a peer leaves from the address that peer sends to: answers to a datagram from
/// its destination, forwards and notices from the one the receiving slot was bound through.
#[test]
fn every_datagram_to_a_peer_leaves_from_the_address_it_sends_to() {
    let mut f = Fixture::new(SessionLimits {
        idle_timeout: Duration::from_secs(60),
        ..SessionLimits::default()
    });
    let (a, b, a2) = (v4(1, 1000), v4(2, 2000), v4(3, 3000));
    let (near, far, third) = (
        Some(IpAddr::from([198, 19, 1, 1])),
        Some(IpAddr::from([198, 18, 1, 1])),
        Some(IpAddr::from([198, 18, 2, 1])),
    );
    let ta = f.mint(SID, Slot::A);
    let tb = f.mint(SID, Slot::B);

    // A binds through `near`: its CHALLENGE and BIND-ACK come from there.
    f.local = near;
    let probe = f.bind_packet(&ta, Slot::A, 1, [0; 16]);
    assert_eq!(sources(f.send(a, &probe)), [(a, near)], "CHALLENGE");
    assert_eq!(
        sources(f.bind(a, &ta, Slot::A, 10)),
        [(a, near)],
        "BIND-ACK"
    );
    // B binds through `far`: its answers come from `far`, and A's peer-present notice from
    // `near`.
    f.local = far;
    assert_eq!(
        sources(f.bind(b, &tb, Slot::B, 10)),
        [(b, far), (a, near)],
        "BIND-ACK and peer-present notice"
    );
    assert_eq!(
        placed_events(&mut f.table).last(),
        Some(&SessionEvent::Bound {
            session: SID,
            slots: [Some(a), Some(b)],
            locals: [near, far],
            budgets: [None, None],
        }),
        "the guard learns where each slot's DATA leaves from"
    );

    // DATA goes out from the receiving slot's address, whichever address it came in on.
    let data = f.data(SID);
    for arrived in [near, far, None] {
        f.local = arrived;
        assert_eq!(f.send(a, &data), Outcome::Forward { to: b, src: far });
        assert_eq!(f.send(b, &data), Outcome::Forward { to: a, src: near });
    }
    // A KEEPALIVE is echoed from where it was sent.
    let mut buf = vec![0; MAX_DATAGRAM];
    let n = wire::encode_keepalive(&mut buf, SID).unwrap();
    f.local = third;
    assert_eq!(
        sources(f.send(a, &buf[..n])),
        [(a, third)],
        "KEEPALIVE echo"
    );
    // An unauthenticated REJECT answers from the BIND's destination.
    let stranger = f.mint(SID + 1, Slot::A);
    let cookie = f.cookie_for(a2, &stranger, Slot::A);
    let mut bad = f.bind_packet(&stranger, Slot::A, 1, cookie);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(sources(f.send(a2, &bad)), [(a2, third)], "REJECT");

    // A moves and REBINDs through `third`: from now on its datagrams leave from there.
    f.local = third;
    assert_eq!(sources(rebind(&mut f, a2, &ta, Slot::A, 11)), [(a2, third)]);
    f.local = far;
    assert_eq!(f.send(b, &data), Outcome::Forward { to: a2, src: third });
    // B BINDs again from the same address through `near` (the same token, a newer
    // sequence): its slot follows, and the guard hears of it.
    placed_events(&mut f.table);
    f.local = near;
    assert_eq!(sources(f.bind(b, &tb, Slot::B, 11)), [(b, near)]);
    assert_eq!(
        placed_events(&mut f.table),
        [SessionEvent::Bound {
            session: SID,
            slots: [Some(a2), Some(b)],
            locals: [third, near],
            budgets: [None, None],
        }]
    );
    assert_eq!(f.send(a2, &data), Outcome::Forward { to: b, src: near });

    // Only A keeps sending, so B idles out: the reaper's CLOSE leaves from B's address.
    for _ in 0..2 {
        f.now += Duration::from_secs(40);
        f.local = third;
        f.send(a2, &buf[..n]);
    }
    f.reap(f.now, T0);
    let notices: Vec<_> = f.notices.iter().map(|n| (n.to, n.src)).collect();
    assert_eq!(notices, [(b, near)], "the idle CLOSE");

    // B binds again through `far`; A's CLOSE goes to B from `far`.
    f.local = far;
    let tb2 = f.mint(SID, Slot::B);
    assert_eq!(
        sources(f.bind(b, &tb2, Slot::B, 20)),
        [(b, far), (a2, third)]
    );
    let keys = SlotKeys::derive(&ta.slot_secret);
    let fields = CloseFields {
        slot: Slot::A,
        reason: CloseReason::PeerClosed,
        seq: 12,
    };
    let n = wire::encode_close(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
    f.local = None;
    assert_eq!(
        sources(f.send(a2, &buf[..n])),
        [(b, far)],
        "the CLOSE notice"
    );
}

/// On a socket bound to a specific address the worker passes no local address, and nothing
/// the relay sends names a source: the kernel sends from the socket's address, as before.
#[test]
fn on_a_specific_address_no_send_names_a_source() {
    let mut f = Fixture::new(SessionLimits::default());
    let (a, b) = (v4(1, 1000), v4(2, 2000));
    let ta = f.mint(SID, Slot::A);
    let tb = f.mint(SID, Slot::B);
    let probe = f.bind_packet(&ta, Slot::A, 1, [0; 16]);
    let mut all = sources(f.send(a, &probe));
    all.extend(sources(f.bind(a, &ta, Slot::A, 10)));
    all.extend(sources(f.bind(b, &tb, Slot::B, 10)));
    all.extend(sources(f.send(a, &f.data(SID))));
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|(_, src)| src.is_none()), "{all:?}");
}

/// The guard's entry for a slot bound through a wildcard listen address names the relay
/// address the slot was bound through as the source of DATA to it; without one (a specific
/// listen address) the listen address; only when neither is known does the fast path let the
/// FIB pick the source.
#[test]
fn the_guard_sends_to_each_slot_from_the_address_it_was_bound_through() {
    use crate::xdp::{KernelClock, RelaySources, entry};

    let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
    let mapped = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let clock = KernelClock::at(Instant::now(), 1 << 40);
    let wildcard = RelaySources::of(&[
        "0.0.0.0:7000".parse().unwrap(),
        "[::]:7001".parse().unwrap(),
    ]);
    let specific = RelaySources::of(&[
        "198.18.1.1:7000".parse().unwrap(),
        "[2001:db8::1]:7001".parse().unwrap(),
    ]);
    let a = v4(2, 1000);
    let b: SocketAddr = "[2001:db8:2::2]:2000".parse().unwrap();
    let far = IpAddr::from([198, 18, 1, 1]);
    let far6 = v6("2001:db8:1::1");
    let slot = |sources: &RelaySources, locals: [Option<IpAddr>; 2]| {
        let e = entry([Some(a), Some(b)], locals, [None, None], sources, &clock);
        e.slots
            .map(|s| (s.relay_addr_set, s.relay_addr, s.relay_port))
    };
    assert_eq!(
        slot(&wildcard, [Some(far), Some(far6)]),
        [(1, mapped(far), 7000), (1, mapped(far6), 7001)],
        "wildcard, bound through known addresses"
    );
    assert_eq!(
        slot(&wildcard, [None, None]),
        [(0, [0; 16], 7000), (0, [0; 16], 7001)],
        "wildcard, unknown: the FIB picks"
    );
    assert_eq!(
        slot(&specific, [None, None]),
        [
            (1, mapped(IpAddr::from([198, 18, 1, 1])), 7000),
            (1, mapped(v6("2001:db8::1")), 7001)
        ],
        "specific listen addresses"
    );
    assert_eq!(
        slot(&wildcard, [Some(far6), Some(far)]),
        [(0, [0; 16], 7000), (0, [0; 16], 7001)],
        "an address of the other family is not the slot's"
    );
}

#[test]
fn what_a_forward_touches_of_a_binding_lies_in_its_first_two_cache_lines() {
    use std::mem::{offset_of, size_of};
    let hot_end = offset_of!(Binding, budget) + size_of::<TokenBucket>();
    assert!(
        hot_end <= 128,
        "address, local address, last seen and budget end at {hot_end}"
    );
    // The slot keys are out of line: a session's two bindings stay a few lines apart.
    let session = size_of::<Session>();
    assert!(
        session <= 512,
        "a session takes {session} bytes in the table"
    );
}
