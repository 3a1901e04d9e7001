//! Two [`Channel`]s over an in-memory link on a virtual clock, the way quinn-proto tests its
//! connection state machine with a pair of endpoints: the clock jumps to the earlier of the two
//! `poll_timeout`s, delivery is instant, and a filter decides the fate of every datagram.

use std::collections::VecDeque;

use super::*;

const SESSION: u64 = 0x5e55_1011;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// What the link does with one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Deliver,
    Drop,
    Duplicate,
    /// Kept aside until [`Pair::release`].
    Hold,
}

/// The frame kind byte of a DATA datagram (1 to 3: handshake, 4: transport).
fn kind(datagram: &[u8]) -> u8 {
    datagram[HEADER_LEN]
}

fn identity(byte: u8) -> LocalIdentity {
    LocalIdentity::from_secret_bytes([byte; 32])
}

fn alice() -> LocalIdentity {
    identity(1)
}

fn bob() -> LocalIdentity {
    identity(2)
}

fn mallory() -> LocalIdentity {
    identity(3)
}

fn initiator(limits: TransportLimits) -> Channel {
    Channel::initiator(
        &alice(),
        PeerExpectation::Pinned(*bob().public()),
        SESSION,
        limits,
    )
    .unwrap()
}

fn responder() -> Channel {
    Channel::responder(
        &bob(),
        PeerExpectation::Pinned(*alice().public()),
        SESSION,
        TransportLimits::default(),
    )
    .unwrap()
}

type Filter = Box<dyn FnMut(Side, u8, Duration) -> Fate>;

struct Pair {
    epoch: Instant,
    now: Instant,
    a: Channel,
    b: Channel,
    known: [KnownPeers; 2],
    in_flight: VecDeque<(Side, Vec<u8>)>,
    held: Vec<(Side, Vec<u8>)>,
    /// Sees (sender, frame kind, time since the start) for every datagram sent.
    filter: Filter,
    /// Every datagram sent: when, by whom, and the bytes.
    sent: Vec<(Duration, Side, Vec<u8>)>,
    /// Plaintexts delivered, by receiver.
    received: Vec<(Side, Vec<u8>)>,
    /// Datagrams dropped by a receiver, and why.
    errors: Vec<(Side, String)>,
}

impl Pair {
    fn new() -> Self {
        Self::with(initiator(TransportLimits::default()), responder())
    }

    fn with(a: Channel, b: Channel) -> Self {
        let epoch = Instant::now();
        Self {
            epoch,
            now: epoch,
            a,
            b,
            known: [KnownPeers::new(), KnownPeers::new()],
            in_flight: VecDeque::new(),
            held: Vec::new(),
            filter: Box::new(|_, _, _| Fate::Deliver),
            sent: Vec::new(),
            received: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn filter(mut self, filter: impl FnMut(Side, u8, Duration) -> Fate + 'static) -> Self {
        self.filter = Box::new(filter);
        self
    }

    fn elapsed(&self) -> Duration {
        self.now - self.epoch
    }

    fn channel(&mut self, side: Side) -> &mut Channel {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// Puts a datagram sent by `from` on the link, as the filter says.
    fn transmit(&mut self, from: Side, bytes: &[u8]) {
        let at = self.elapsed();
        self.sent.push((at, from, bytes.to_vec()));
        let to = from.other();
        match (self.filter)(from, kind(bytes), at) {
            Fate::Deliver => self.in_flight.push_back((to, bytes.to_vec())),
            Fate::Drop => {}
            Fate::Duplicate => {
                self.in_flight.push_back((to, bytes.to_vec()));
                self.in_flight.push_back((to, bytes.to_vec()));
            }
            Fate::Hold => self.held.push((to, bytes.to_vec())),
        }
    }

    /// Delivers `bytes` to `to` as if the relay forwarded them, bypassing the filter.
    fn inject(&mut self, to: Side, bytes: &[u8]) {
        self.in_flight.push_back((to, bytes.to_vec()));
        self.deliver();
    }

    /// Delivers the held datagrams, in the order they were held.
    fn release(&mut self) {
        self.in_flight.extend(self.held.drain(..));
        self.deliver();
    }

    /// Delivers everything on the link, and whatever the receivers answer, until it is quiet.
    fn deliver(&mut self) {
        let mut out = vec![0u8; wire::MAX_DATAGRAM];
        while let Some((to, mut bytes)) = self.in_flight.pop_front() {
            let now = self.now;
            let idx = usize::from(to == Side::B);
            let mut known = std::mem::take(&mut self.known[idx]);
            let result = self
                .channel(to)
                .handle(now, &mut bytes, &mut known, &mut out);
            self.known[idx] = known;
            match result {
                Ok(output) => {
                    if let Some(range) = output.plaintext {
                        self.received.push((to, bytes[range].to_vec()));
                    }
                    if let Some(n) = output.transmit {
                        self.transmit(to, &out[..n]);
                    }
                }
                Err(error) => self.errors.push((to, error.to_string())),
            }
        }
    }

    fn start(&mut self) {
        let mut out = vec![0u8; wire::MAX_DATAGRAM];
        let now = self.now;
        let n = self.a.start(now, &mut out).unwrap();
        self.transmit(Side::A, &out[..n]);
        self.deliver();
    }

    /// Advances the clock to the earlier timer and runs what is due. False when no timer is
    /// set.
    fn step(&mut self) -> bool {
        let Some(next) = [self.a.poll_timeout(), self.b.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
        else {
            return false;
        };
        self.now = self.now.max(next);
        let mut out = vec![0u8; wire::MAX_DATAGRAM];
        for side in [Side::A, Side::B] {
            let now = self.now;
            if self.channel(side).poll_timeout().is_some_and(|t| t <= now)
                && let Some(n) = self.channel(side).on_timeout(now, &mut out).unwrap()
            {
                self.transmit(side, &out[..n]);
            }
        }
        self.deliver();
        true
    }

    /// Steps until `done` or until the clock passes `limit` after the start; returns whether
    /// `done` held.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        while !done(self) {
            if self.elapsed() > limit || !self.step() {
                return done(self);
            }
        }
        true
    }

    fn connected(&self) -> bool {
        self.a.is_confirmed() && self.b.is_confirmed()
    }

    /// Sends `message` from `from` and checks that it arrives intact.
    fn talk(&mut self, from: Side, message: &[u8]) {
        let mut out = vec![0u8; wire::MAX_DATAGRAM];
        let now = self.now;
        let n = self.channel(from).send(now, message, &mut out).unwrap();
        let before = self.received.len();
        self.in_flight.push_back((from.other(), out[..n].to_vec()));
        self.deliver();
        assert_eq!(
            self.received.get(before),
            Some(&(from.other(), message.to_vec())),
            "{from:?}'s message should arrive; errors: {:?}",
            self.errors
        );
    }

    /// When `side` sent frames of `kind`, in whole milliseconds since the start.
    fn sent_at(&self, side: Side, kind_byte: u8) -> Vec<u128> {
        self.sent
            .iter()
            .filter(|(_, from, bytes)| *from == side && kind(bytes) == kind_byte)
            .map(|(at, _, _)| at.as_millis())
            .collect()
    }

    fn sent_bytes(&self, side: Side, kind_byte: u8) -> Vec<Vec<u8>> {
        self.sent
            .iter()
            .filter(|(_, from, bytes)| *from == side && kind(bytes) == kind_byte)
            .map(|(_, _, bytes)| bytes.clone())
            .collect()
    }
}

/// A filter that drops the first `n` frames of `kind` sent by `side`.
fn drop_first(side: Side, kind_byte: u8, mut n: usize) -> impl FnMut(Side, u8, Duration) -> Fate {
    move |from, k, _| match from == side && k == kind_byte && n > 0 {
        true => {
            n -= 1;
            Fate::Drop
        }
        false => Fate::Deliver,
    }
}

/// A HANDSHAKE-1 from someone who is not Alice (a fresh ephemeral, as a forger would send).
fn forged_message1() -> Vec<u8> {
    let mut mallory = Channel::initiator(
        &mallory(),
        PeerExpectation::Pinned(*bob().public()),
        SESSION,
        TransportLimits::default(),
    )
    .unwrap();
    let mut out = vec![0u8; wire::MAX_DATAGRAM];
    let n = mallory.start(Instant::now(), &mut out).unwrap();
    out.truncate(n);
    out
}

#[test]
fn establishes_in_one_round_trip_and_confirms() {
    let mut pair = Pair::new();
    pair.start();
    assert!(pair.connected(), "errors: {:?}", pair.errors);
    let kinds: Vec<(Side, u8)> = pair
        .sent
        .iter()
        .map(|(_, side, bytes)| (*side, kind(bytes)))
        .collect();
    assert_eq!(
        kinds,
        [(Side::A, 1), (Side::B, 2), (Side::A, 3), (Side::B, 4)]
    );
    // The confirmation is an empty TRANSPORT frame and delivers no message.
    assert_eq!(pair.sent[3].2.len(), HEADER_LEN + 29);
    assert!(pair.received.is_empty());
    assert_eq!(pair.a.remote_identity(), Some(*bob().public()));
    assert_eq!(pair.b.remote_identity(), Some(*alice().public()));
    pair.talk(Side::A, b"hello bob");
    pair.talk(Side::B, b"hello alice");
    // Nothing is pending but the initiator's re-handshake before the maximum age.
    assert_eq!(pair.b.poll_timeout(), None);
    assert_eq!(
        pair.a.poll_timeout(),
        Some(pair.now + Duration::from_secs(24 * 3600 - 60))
    );
}

#[test]
fn lost_message1_is_resent_fresh_after_one_second() {
    let mut pair = Pair::new().filter(drop_first(Side::A, 1, 1));
    pair.start();
    assert!(!pair.a.is_established());
    assert_eq!(pair.a.poll_timeout(), Some(pair.epoch + RETRY_INITIAL));
    assert!(pair.run_until(Duration::from_secs(30), Pair::connected));
    assert_eq!(pair.elapsed(), RETRY_INITIAL);
    let ones = pair.sent_bytes(Side::A, 1);
    assert_eq!(ones.len(), 2);
    assert_ne!(ones[0], ones[1], "each retry is a fresh handshake");
    pair.talk(Side::A, b"after a lost message 1");
}

#[test]
fn lost_message2_is_recovered_by_a_fresh_message1() {
    let mut pair = Pair::new().filter(drop_first(Side::B, 2, 1));
    pair.start();
    assert!(pair.run_until(Duration::from_secs(30), Pair::connected));
    assert_eq!(pair.elapsed(), RETRY_INITIAL);
    assert_eq!(pair.sent_at(Side::A, 1), [0, 1000]);
    pair.talk(Side::B, b"after a lost message 2");
}

#[test]
fn lost_message3_is_resent_unchanged() {
    let mut pair = Pair::new().filter(drop_first(Side::A, 3, 1));
    pair.start();
    assert!(pair.a.is_established() && !pair.a.is_confirmed());
    assert!(!pair.b.is_established());
    assert!(pair.run_until(Duration::from_secs(30), Pair::connected));
    assert_eq!(pair.elapsed(), RETRY_INITIAL);
    let threes = pair.sent_bytes(Side::A, 3);
    assert_eq!(threes.len(), 2);
    assert_eq!(threes[0], threes[1]);
    assert_eq!(pair.sent_at(Side::A, 1), [0], "no new handshake");
    pair.talk(Side::A, b"after a lost message 3");
    pair.talk(Side::B, b"and back");
}

#[test]
fn initiator_may_send_before_confirmation() {
    let mut pair = Pair::new().filter(drop_first(Side::A, 3, 1));
    pair.start();
    let mut out = vec![0u8; wire::MAX_DATAGRAM];
    let now = pair.now;
    let n = pair.a.send(now, b"early", &mut out).unwrap();
    let early = out[..n].to_vec();
    // Before message 3 the responder cannot open it.
    pair.inject(Side::B, &early);
    assert!(pair.received.is_empty());
    assert!(pair.run_until(Duration::from_secs(30), Pair::connected));
    // A copy sent again after message 3 opens: the initiator's key was right all along.
    pair.inject(Side::B, &early);
    assert_eq!(pair.received, [(Side::B, b"early".to_vec())]);
}

#[test]
fn lost_confirmation_is_repeated_on_the_repeated_message3() {
    let mut pair = Pair::new().filter(drop_first(Side::B, 4, 1));
    pair.start();
    assert!(pair.b.is_confirmed());
    assert!(!pair.a.is_confirmed());
    assert!(pair.run_until(Duration::from_secs(30), Pair::connected));
    assert_eq!(pair.elapsed(), RETRY_INITIAL);
    assert_eq!(pair.sent_at(Side::B, 4), [0, 1000]);
    pair.talk(Side::B, b"after a lost confirmation");
}

#[test]
fn data_from_the_responder_confirms_too() {
    let mut pair = Pair::new().filter(drop_first(Side::B, 4, 1));
    pair.start();
    assert!(!pair.a.is_confirmed());
    pair.talk(Side::B, b"data confirms");
    assert!(pair.a.is_confirmed());
    assert_eq!(pair.a.poll_timeout(), pair.a.rehandshake_at());
}

#[test]
fn message1_back_off_is_exact() {
    // The responder is not bound for the first 40 s: every message 1 is lost.
    let mut pair = Pair::new().filter(|from, k, at| match (from, k) {
        (Side::A, 1) if at < Duration::from_secs(40) => Fate::Drop,
        _ => Fate::Deliver,
    });
    pair.start();
    assert!(pair.run_until(Duration::from_secs(60), Pair::connected));
    assert_eq!(
        pair.sent_at(Side::A, 1),
        [0, 1000, 3000, 7000, 15000, 23000, 31000, 39000, 47000]
    );
    assert_eq!(pair.elapsed(), Duration::from_secs(47));
}

#[test]
fn responder_bound_late_still_establishes() {
    // The relay drops DATA while the session is half bound: message 1s are lost for 5 s.
    let mut pair = Pair::new().filter(|from, k, at| match (from, k) {
        (Side::A, 1) if at < Duration::from_secs(5) => Fate::Drop,
        _ => Fate::Deliver,
    });
    pair.start();
    assert!(pair.run_until(Duration::from_secs(30), Pair::connected));
    assert_eq!(pair.sent_at(Side::A, 1), [0, 1000, 3000, 7000]);
    assert_eq!(pair.elapsed(), Duration::from_secs(7));
    pair.talk(Side::A, b"late but there");
}

#[test]
fn unconfirmed_initiator_resends_message3_then_starts_over() {
    let mut pair = Pair::new().filter(|from, k, at| match (from, k) {
        (Side::A, 3) if at < Duration::from_secs(20) => Fate::Drop,
        _ => Fate::Deliver,
    });
    pair.start();
    assert!(pair.run_until(Duration::from_secs(60), Pair::connected));
    assert_eq!(
        pair.sent_at(Side::A, 3),
        [0, 1000, 3000, 7000, 15000, 23000]
    );
    assert_eq!(pair.sent_at(Side::A, 1), [0, 23000]);
    assert_eq!(pair.elapsed(), Duration::from_secs(23));
    // The responder dropped its unfinished handshake after the handshake timeout.
    assert_eq!(pair.b.poll_timeout(), None);
    pair.talk(Side::B, b"second attempt");
}

#[test]
fn forged_message1_before_the_genuine_one_costs_nothing() {
    let mut pair = Pair::new();
    pair.inject(Side::B, &forged_message1());
    assert_eq!(pair.sent_at(Side::B, 2), [0], "the forgery is answered");
    // Alice drops the answer to a message 1 she never sent.
    assert_eq!(pair.errors.len(), 1);
    pair.start();
    assert!(pair.connected(), "errors: {:?}", pair.errors);
    assert_eq!(pair.sent_at(Side::A, 1), [0]);
    pair.talk(Side::A, b"through");
}

#[test]
fn forged_message1_after_the_genuine_one_costs_nothing() {
    // Hold Alice's message 3 while a forgery reaches Bob between message 1 and message 3.
    let mut pair = Pair::new().filter(|from, k, _| match (from, k) {
        (Side::A, 3) => Fate::Hold,
        _ => Fate::Deliver,
    });
    pair.start();
    pair.inject(Side::B, &forged_message1());
    assert_eq!(pair.sent_at(Side::B, 2).len(), 2);
    pair.filter = Box::new(|_, _, _| Fate::Deliver);
    pair.release();
    assert!(pair.connected(), "errors: {:?}", pair.errors);
    assert_eq!(pair.sent_at(Side::A, 1), [0]);
    pair.talk(Side::B, b"through");
}

#[test]
fn forged_message3_changes_nothing() {
    let mut pair = Pair::new().filter(|from, k, _| match (from, k) {
        (Side::A, 3) => Fate::Hold,
        _ => Fate::Deliver,
    });
    pair.start();
    let mut forged = pair.held[0].1.clone();
    forged[HEADER_LEN + 10] ^= 1;
    pair.inject(Side::B, &forged);
    assert!(!pair.b.is_established());
    pair.filter = Box::new(|_, _, _| Fate::Deliver);
    pair.release();
    assert!(pair.connected(), "errors: {:?}", pair.errors);
}

#[test]
fn replayed_or_forged_message1_does_not_break_an_established_session() {
    let mut pair = Pair::new();
    pair.start();
    assert!(pair.connected());
    let genuine = pair.sent_bytes(Side::A, 1).remove(0);

    // The genuine message 1 replayed: recognized, not answered.
    pair.inject(Side::B, &genuine);
    assert_eq!(pair.sent_at(Side::B, 2), [0]);
    assert!(pair.b.is_confirmed());
    pair.talk(Side::A, b"still here");

    // A forged one: answered once (Alice drops the answer), the transport untouched.
    pair.inject(Side::B, &forged_message1());
    assert_eq!(pair.sent_at(Side::B, 2), [0, 0]);
    assert!(pair.b.is_handshaking());
    pair.talk(Side::A, b"still here");
    pair.talk(Side::B, b"and back");

    // More forgeries within the answer interval are not answered; a second later they are.
    pair.inject(Side::B, &forged_message1());
    assert_eq!(pair.sent_at(Side::B, 2), [0, 0]);
    pair.now += RETRY_INITIAL - Duration::from_millis(1);
    pair.inject(Side::B, &forged_message1());
    assert_eq!(pair.sent_at(Side::B, 2), [0, 0]);
    pair.now += Duration::from_millis(1);
    pair.inject(Side::B, &forged_message1());
    assert_eq!(pair.sent_at(Side::B, 2), [0, 0, 1000]);
    pair.talk(Side::A, b"still here");

    // The unfinished handshakes go after the handshake timeout, each after its own.
    assert_eq!(pair.b.poll_timeout(), Some(pair.epoch + HANDSHAKE_TIMEOUT));
    assert!(pair.run_until(Duration::from_secs(30), |p| !p.b.is_handshaking()));
    assert_eq!(pair.elapsed(), HANDSHAKE_TIMEOUT + RETRY_INITIAL);
    pair.talk(Side::A, b"after the timeout");
    pair.talk(Side::B, b"and back");
}

#[test]
fn duplicated_datagrams_do_not_disturb_the_handshake() {
    let mut pair = Pair::new().filter(|_, _, _| Fate::Duplicate);
    pair.start();
    assert!(pair.connected(), "errors: {:?}", pair.errors);
    assert_eq!(
        pair.sent_at(Side::B, 2),
        [0],
        "a repeated message 1 is not answered"
    );
    // The repeated message 3 within the retry interval gets no second confirmation.
    assert_eq!(pair.sent_at(Side::B, 4), [0]);
    pair.talk(Side::A, b"once");
    assert_eq!(pair.received.len(), 1);
}

#[test]
fn reordered_handshake_from_two_attempts_establishes() {
    // The first message 2 is late: it arrives after the retry, answering a handshake Alice has
    // given up; the answer to the second one completes.
    let mut pair = Pair::new().filter({
        let mut first = true;
        move |from, k, _| match (from, k) {
            (Side::B, 2) if first => {
                first = false;
                Fate::Hold
            }
            _ => Fate::Deliver,
        }
    });
    pair.start();
    assert!(pair.run_until(Duration::from_secs(30), Pair::connected));
    pair.release();
    assert!(pair.connected());
    pair.talk(Side::A, b"ordered");
}

#[test]
fn restarted_initiator_re_establishes_while_the_old_transport_works() {
    let mut pair = Pair::new();
    pair.start();
    assert!(pair.connected());
    // Alice restarts: a fresh channel. Hold its message 3 for a moment.
    let old_alice = std::mem::replace(&mut pair.a, initiator(TransportLimits::default()));
    pair.filter = Box::new(|from, k, _| match (from, k) {
        (Side::A, 3) => Fate::Hold,
        _ => Fate::Deliver,
    });
    pair.start();
    assert!(pair.a.is_established() && pair.b.is_handshaking());
    // Until message 3 arrives, Bob's old transport still talks to the old Alice.
    let new_alice = std::mem::replace(&mut pair.a, old_alice);
    pair.talk(Side::A, b"old alice");
    pair.talk(Side::B, b"old bob");
    pair.a = new_alice;
    pair.filter = Box::new(|_, _, _| Fate::Deliver);
    pair.release();
    assert!(pair.connected(), "errors: {:?}", pair.errors);
    pair.talk(Side::A, b"new alice");
    pair.talk(Side::B, b"new bob");
}

#[test]
fn restarted_responder_is_recovered_by_a_rehandshake() {
    let mut pair = Pair::new();
    pair.start();
    pair.b = responder();
    pair.start();
    assert!(pair.connected(), "errors: {:?}", pair.errors);
    pair.talk(Side::A, b"again");
    pair.talk(Side::B, b"again");
}

#[test]
fn rehandshake_keeps_sending_on_the_old_transport_until_confirmed() {
    let mut pair = Pair::new();
    pair.start();
    let old_epoch_counter = pair.a.transport().unwrap().send_counter();
    pair.filter = Box::new(|from, k, _| match (from, k) {
        (Side::A, 3) => Fate::Hold,
        _ => Fate::Deliver,
    });
    pair.start();
    assert!(!pair.a.is_confirmed());
    // The old transport carries data meanwhile, both ways.
    pair.talk(Side::A, b"on the old keys");
    pair.talk(Side::B, b"on the old keys");
    assert_eq!(
        pair.a.transport().unwrap().send_counter(),
        old_epoch_counter + 1
    );
    pair.filter = Box::new(|_, _, _| Fate::Deliver);
    pair.release();
    assert!(pair.connected());
    assert_eq!(pair.a.transport().unwrap().send_counter(), 0, "new keys");
    pair.talk(Side::A, b"on the new keys");
}

#[test]
fn wrong_identity_is_refused_and_the_old_transport_stays() {
    let mut pair = Pair::new();
    pair.start();
    assert!(pair.connected());
    // Mallory runs a whole handshake with Bob from her own key.
    let mut mallory = Channel::initiator(
        &mallory(),
        PeerExpectation::Pinned(*bob().public()),
        SESSION,
        TransportLimits::default(),
    )
    .unwrap();
    let mut known = KnownPeers::new();
    let (mut m1, mut m2, mut m3) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
    let now = pair.now;
    let n1 = mallory.start(now, &mut m1).unwrap();
    let out = pair
        .b
        .handle(now, &mut m1[..n1], &mut pair.known[1], &mut m2);
    let n2 = out.unwrap().transmit.unwrap();
    let n3 = mallory
        .handle(now, &mut m2[..n2], &mut known, &mut m3)
        .unwrap()
        .transmit
        .unwrap();
    let mut scratch = vec![0u8; 2048];
    let refused = pair
        .b
        .handle(now, &mut m3[..n3], &mut pair.known[1], &mut scratch);
    assert!(matches!(
        refused,
        Err(ChannelError::Noise(NoiseError::WrongIdentity))
    ));
    assert!(pair.b.is_confirmed() && !pair.b.is_handshaking());
    assert_eq!(pair.b.remote_identity(), Some(*alice().public()));
    pair.talk(Side::A, b"alice still");
    pair.talk(Side::B, b"bob still");
}

#[test]
fn initiator_refuses_a_responder_with_the_wrong_key_and_retries() {
    let alice_expects_mallory = Channel::initiator(
        &alice(),
        PeerExpectation::Pinned(*mallory().public()),
        SESSION,
        TransportLimits::default(),
    )
    .unwrap();
    let mut pair = Pair::with(alice_expects_mallory, responder());
    pair.start();
    assert!(!pair.a.is_established());
    assert_eq!(pair.errors.len(), 1);
    assert!(pair.errors[0].1.contains("wrong identity"));
    assert_eq!(pair.a.poll_timeout(), Some(pair.epoch + RETRY_INITIAL));
    pair.step();
    assert_eq!(pair.sent_at(Side::A, 1), [0, 1000]);
    assert!(!pair.a.is_established());
}

#[test]
fn initiator_rehandshakes_before_the_maximum_age() {
    let limits = TransportLimits {
        max_age: Duration::from_secs(400),
        ..TransportLimits::default()
    };
    let mut pair = Pair::with(initiator(limits), responder());
    pair.start();
    // max_age − min(60 s, max_age / 4) = 340 s.
    assert_eq!(
        pair.a.poll_timeout(),
        Some(pair.epoch + Duration::from_secs(340))
    );
    assert!(
        pair.run_until(Duration::from_secs(400), |p| p.sent_at(Side::A, 1).len()
            == 2)
    );
    assert_eq!(pair.sent_at(Side::A, 1), [0, 340_000]);
    assert!(pair.connected());
    // Past the first transport's maximum age the session goes on under the new one.
    pair.now = pair.epoch + Duration::from_secs(500);
    pair.talk(Side::A, b"a new day");
    pair.talk(Side::B, b"a new day");
}

#[test]
fn replaced_transport_is_dropped_after_the_handshake_timeout() {
    let mut pair = Pair::new();
    pair.start();
    let mut out = vec![0u8; wire::MAX_DATAGRAM];
    let mut late = [1, 2].map(|_| {
        let n = pair.b.send(pair.now, b"late", &mut out).unwrap();
        out[..n].to_vec()
    });
    pair.start();
    assert!(pair.connected());
    // A frame from the old transport still opens for a while…
    let mut known = KnownPeers::new();
    let now = pair.now;
    let opened = pair
        .a
        .handle(now, &mut late[0], &mut known, &mut out)
        .unwrap();
    assert!(opened.plaintext.is_some());
    // …but not after the handshake timeout.
    assert!(pair.run_until(Duration::from_secs(30), |p| p.elapsed()
        >= HANDSHAKE_TIMEOUT));
    let now = pair.now;
    assert!(
        pair.a
            .handle(now, &mut late[1], &mut known, &mut out)
            .is_err()
    );
}
