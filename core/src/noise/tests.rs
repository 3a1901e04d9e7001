//! Two peers in memory, quinn-proto `Pair` style: a shared fake clock (a base `Instant` plus an
//! offset), frames moved by hand.

use std::time::{Duration, Instant};

use super::frame::{MAX_FRAME_LEN, MAX_PLAINTEXT};
use super::transport::MAX_EPOCH_SKIP;
use super::*;
use crate::known_peers::KnownPeers;

const SESSION: u64 = 0x0123_4567_89ab_cdef;

fn identity(seed: u8) -> LocalIdentity {
    LocalIdentity::from_secret_bytes([seed; 32])
}

/// A fake clock: `now()` is the base plus everything `advance`d so far.
struct Clock {
    base: Instant,
    offset: Duration,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            offset: Duration::ZERO,
        }
    }
    fn now(&self) -> Instant {
        self.base + self.offset
    }
    fn advance(&mut self, by: Duration) {
        self.offset += by;
    }
}

/// Runs the three messages from `a` (initiator) to `b` (responder) and back.
fn run_handshake(
    a: &mut Handshake,
    b: &mut Handshake,
    known_a: &mut KnownPeers,
    known_b: &mut KnownPeers,
) -> Result<(), NoiseError> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = a.write_message(&mut buf)?;
    assert_eq!(n, 33);
    b.read_message(&buf[..n], known_b)?;
    let n = b.write_message(&mut buf)?;
    assert_eq!(n, 97);
    a.read_message(&buf[..n], known_a)?;
    let n = a.write_message(&mut buf)?;
    assert_eq!(n, 65);
    b.read_message(&buf[..n], known_b)
}

struct Pair {
    clock: Clock,
    a: Transport,
    b: Transport,
}

impl Pair {
    fn new(limits: TransportLimits) -> Self {
        let (ida, idb) = (identity(1), identity(2));
        let mut a = Handshake::initiator(&ida, PeerExpectation::Pinned(*idb.public()), SESSION)
            .expect("initiator");
        let mut b = Handshake::responder(&idb, PeerExpectation::Pinned(*ida.public()), SESSION)
            .expect("responder");
        let (mut ka, mut kb) = (KnownPeers::new(), KnownPeers::new());
        run_handshake(&mut a, &mut b, &mut ka, &mut kb).expect("handshake");
        assert!(a.is_finished() && b.is_finished());
        let clock = Clock::new();
        Self {
            a: a.into_transport(clock.now(), limits).expect("a transport"),
            b: b.into_transport(clock.now(), limits).expect("b transport"),
            clock,
        }
    }

    /// Seals `msg` from a.
    fn a_seal(&mut self, msg: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; msg.len() + 29];
        let n = self.a.seal(self.clock.now(), msg, &mut out).expect("seal");
        out.truncate(n);
        out
    }

    fn b_open(&mut self, frame: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let mut out = vec![0u8; frame.len()];
        let n = self.b.open(self.clock.now(), frame, &mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

fn small_rekey(messages: u64) -> TransportLimits {
    TransportLimits {
        rekey_after_messages: messages,
        ..TransportLimits::default()
    }
}

#[test]
fn handshake_then_transport_both_ways() {
    let mut pair = Pair::new(TransportLimits::default());
    assert_eq!(pair.a.remote_identity(), identity(2).public());
    assert_eq!(pair.b.remote_identity(), identity(1).public());
    for i in 0..20u8 {
        let msg = vec![i; usize::from(i) * 70];
        let frame = pair.a_seal(&msg);
        assert_eq!(pair.b_open(&frame).expect("a -> b"), msg);

        let mut buf = [0u8; 1500];
        buf[13..13 + msg.len()].copy_from_slice(&msg);
        let n = pair
            .b
            .seal_in_place(pair.clock.now(), &mut buf, msg.len())
            .expect("seal");
        let range = pair
            .a
            .open_in_place(pair.clock.now(), &mut buf[..n])
            .expect("b -> a");
        assert_eq!(&buf[range], &msg[..]);
    }
    assert_eq!(pair.a.stats().sent, 20);
    assert_eq!(pair.a.stats().received, 20);
    assert_eq!(pair.b.stats().received, 20);
}

#[test]
fn sizes_are_checked() {
    let mut pair = Pair::new(TransportLimits::default());
    let now = pair.clock.now();
    let big = [0u8; MAX_PLAINTEXT + 1];
    let mut out = [0u8; 2000];
    assert!(matches!(
        pair.a.seal(now, &big, &mut out),
        Err(NoiseError::PayloadTooLarge(1428))
    ));
    let n = pair
        .a
        .seal(now, &big[..MAX_PLAINTEXT], &mut out)
        .expect("max");
    assert_eq!(n, MAX_FRAME_LEN);
    assert!(matches!(
        pair.a.seal(now, &[1, 2, 3], &mut out[..31]),
        Err(NoiseError::BufferTooSmall { needed: 32 })
    ));
    let frame = out[..n].to_vec();
    assert!(matches!(
        pair.b.open(now, &frame, &mut out[..100]),
        Err(NoiseError::BufferTooSmall { .. })
    ));
    // A refused open did not consume the counter.
    assert_eq!(
        pair.b.open(now, &frame, &mut out).expect("open"),
        MAX_PLAINTEXT
    );
    // The empty plaintext is a valid frame.
    let empty = pair.a_seal(&[]);
    assert_eq!(pair.b_open(&empty).expect("empty"), Vec::<u8>::new());
}

#[test]
fn every_bit_flip_is_rejected() {
    let mut pair = Pair::new(TransportLimits::default());
    let frame = pair.a_seal(b"attack at dawn");
    for bit in 0..frame.len() * 8 {
        let mut tampered = frame.clone();
        tampered[bit / 8] ^= 1 << (bit % 8);
        let error = pair.b_open(&tampered).expect_err("tampered frame accepted");
        assert!(
            matches!(
                error,
                NoiseError::Decrypt | NoiseError::Frame(_) | NoiseError::UnknownEpoch
            ),
            "bit {bit}: {error:?}"
        );
        let range = pair.b.open_in_place(pair.clock.now(), &mut tampered);
        assert!(range.is_err(), "bit {bit} accepted in place");
    }
    assert_eq!(pair.b.recv_epoch(), 0);
    assert_eq!(pair.b_open(&frame).expect("original"), b"attack at dawn");
    assert_eq!(pair.b.stats().received, 1);
}

#[test]
fn replayed_frame_is_rejected() {
    let mut pair = Pair::new(TransportLimits::default());
    let frame = pair.a_seal(b"once");
    pair.b_open(&frame).expect("first");
    assert!(matches!(pair.b_open(&frame), Err(NoiseError::Replayed)));
    let mut copy = frame.clone();
    assert!(matches!(
        pair.b.open_in_place(pair.clock.now(), &mut copy),
        Err(NoiseError::Replayed)
    ));
}

#[test]
fn reordering_inside_the_window_only() {
    let mut pair = Pair::new(TransportLimits::default());
    let frames: Vec<_> = (0..=WINDOW_SIZE)
        .map(|i| pair.a_seal(&i.to_be_bytes()))
        .collect();
    // Deliver everything but the first two, newest (counter 8192) last.
    for frame in &frames[2..] {
        pair.b_open(frame).expect("in order");
    }
    // The window holds the newest 8192 counters, 1..=8192: frame 1 is its oldest.
    assert_eq!(
        pair.b_open(&frames[1]).expect("late but inside"),
        1u64.to_be_bytes()
    );
    // Frame 0 is one further back: too old.
    assert!(matches!(pair.b_open(&frames[0]), Err(NoiseError::TooOld)));
    // Reordered near the top.
    let (x, y) = (pair.a_seal(b"x"), pair.a_seal(b"y"));
    pair.b_open(&y).expect("y first");
    pair.b_open(&x).expect("x after");
}

#[test]
fn forged_huge_counter_does_not_move_the_window() {
    let mut pair = Pair::new(TransportLimits::default());
    let first = pair.a_seal(b"first");
    let mut forged = pair.a_seal(b"forged");
    forged[5..13].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
    assert!(matches!(pair.b_open(&forged), Err(NoiseError::Decrypt)));
    forged[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        pair.b_open(&forged),
        Err(NoiseError::Frame(FrameError::ReservedCounter))
    ));
    // The window did not jump: counter 0 is still fresh.
    assert_eq!(pair.b_open(&first).expect("first"), b"first");
    // A forged frame of the next epoch does not shift epochs either.
    let mut next_epoch = pair.a_seal(b"epoch");
    next_epoch[1..5].copy_from_slice(&1u32.to_be_bytes());
    assert!(matches!(pair.b_open(&next_epoch), Err(NoiseError::Decrypt)));
    assert_eq!(pair.b.recv_epoch(), 0);
}

fn identity_result(
    expect_a: PeerExpectation,
    expect_b: PeerExpectation,
    known_a: &mut KnownPeers,
    known_b: &mut KnownPeers,
) -> (Result<(), NoiseError>, Handshake, Handshake) {
    let mut a = Handshake::initiator(&identity(1), expect_a, SESSION).expect("initiator");
    let mut b = Handshake::responder(&identity(2), expect_b, SESSION).expect("responder");
    let result = run_handshake(&mut a, &mut b, known_a, known_b);
    (result, a, b)
}

#[test]
fn wrong_pinned_identity_on_each_side() {
    let right_a = PeerExpectation::Pinned(*identity(2).public());
    let right_b = PeerExpectation::Pinned(*identity(1).public());
    let wrong = PeerExpectation::Pinned(*identity(9).public());
    let (mut ka, mut kb) = (KnownPeers::new(), KnownPeers::new());

    // The initiator notices after message 2 and never sends message 3.
    let (result, mut a, b) = identity_result(wrong.clone(), right_b, &mut ka, &mut kb);
    assert!(matches!(result, Err(NoiseError::WrongIdentity)));
    assert!(a.remote_identity().is_none());
    assert!(matches!(
        a.write_message(&mut [0; 100]),
        Err(NoiseError::HandshakeFailed)
    ));
    assert!(!b.is_finished());
    let now = Instant::now();
    assert!(matches!(
        a.into_transport(now, TransportLimits::default()),
        Err(NoiseError::HandshakeFailed)
    ));
    assert!(matches!(
        b.into_transport(now, TransportLimits::default()),
        Err(NoiseError::HandshakeIncomplete)
    ));

    // The responder notices after message 3.
    let (result, a, b) = identity_result(right_a, wrong, &mut ka, &mut kb);
    assert!(matches!(result, Err(NoiseError::WrongIdentity)));
    assert!(a.is_finished());
    assert!(!b.is_finished());
    assert!(matches!(
        b.into_transport(now, TransportLimits::default()),
        Err(NoiseError::HandshakeFailed)
    ));
}

#[test]
fn trust_on_first_use() {
    let tofu = |name: &str| PeerExpectation::TrustOnFirstUse {
        name: name.to_owned(),
    };
    let (mut ka, mut kb) = (KnownPeers::new(), KnownPeers::new());

    let (result, a, b) = identity_result(tofu("bob"), tofu("alice"), &mut ka, &mut kb);
    result.expect("first use");
    assert_eq!(a.identity_check(), Some(IdentityCheck::Recorded));
    assert_eq!(b.identity_check(), Some(IdentityCheck::Recorded));
    assert_eq!(ka.get("bob"), Some(identity(2).public()));
    assert_eq!(kb.get("alice"), Some(identity(1).public()));

    let (result, a, _) = identity_result(tofu("bob"), tofu("alice"), &mut ka, &mut kb);
    result.expect("second use, same keys");
    assert_eq!(a.identity_check(), Some(IdentityCheck::Known));

    // Someone else claims to be bob (a's record) and alice (b's record).
    let mut a = Handshake::initiator(&identity(1), tofu("bob"), SESSION).expect("initiator");
    let mut mallory =
        Handshake::responder(&identity(7), tofu("alice"), SESSION).expect("responder");
    let result = run_handshake(&mut a, &mut mallory, &mut ka, &mut KnownPeers::new());
    assert!(matches!(result, Err(NoiseError::WrongIdentity)));
    assert_eq!(
        ka.get("bob"),
        Some(identity(2).public()),
        "record unchanged"
    );

    let mut mallory = Handshake::initiator(&identity(7), tofu("bob"), SESSION).expect("initiator");
    let mut b = Handshake::responder(&identity(2), tofu("alice"), SESSION).expect("responder");
    let result = run_handshake(&mut mallory, &mut b, &mut KnownPeers::new(), &mut kb);
    assert!(matches!(result, Err(NoiseError::WrongIdentity)));

    assert!(matches!(
        Handshake::initiator(&identity(1), tofu("no spaces"), SESSION),
        Err(NoiseError::InvalidPeerName)
    ));
}

#[test]
fn session_id_is_bound() {
    let mut a = Handshake::initiator(
        &identity(1),
        PeerExpectation::Pinned(*identity(2).public()),
        1,
    )
    .expect("initiator");
    let mut b = Handshake::responder(
        &identity(2),
        PeerExpectation::Pinned(*identity(1).public()),
        2,
    )
    .expect("responder");
    let result = run_handshake(
        &mut a,
        &mut b,
        &mut KnownPeers::new(),
        &mut KnownPeers::new(),
    );
    assert!(matches!(result, Err(NoiseError::Decrypt)));
}

#[test]
fn out_of_turn_and_garbage_handshake_messages() {
    let (ida, idb) = (identity(1), identity(2));
    let mut a = Handshake::initiator(&ida, PeerExpectation::Pinned(*idb.public()), SESSION)
        .expect("initiator");
    let mut b = Handshake::responder(&idb, PeerExpectation::Pinned(*ida.public()), SESSION)
        .expect("responder");
    let mut known = KnownPeers::new();
    let mut buf = [0u8; 200];
    assert!(matches!(
        b.write_message(&mut buf),
        Err(NoiseError::UnexpectedMessage)
    ));
    assert!(matches!(
        a.write_message(&mut buf[..32]),
        Err(NoiseError::BufferTooSmall { needed: 33 })
    ));
    let n = a.write_message(&mut buf).expect("msg 1");
    let msg1 = buf[..n].to_vec();
    assert!(matches!(
        a.read_message(&msg1, &mut known),
        Err(NoiseError::UnexpectedMessage)
    ));
    b.read_message(&msg1, &mut known).expect("msg 1");
    let n = b.write_message(&mut buf).expect("msg 2");
    let mut msg2 = buf[..n].to_vec();
    // A corrupted message 2 fails and leaves the initiator able to read the real one.
    msg2[50] ^= 1;
    assert!(matches!(
        a.read_message(&msg2, &mut known),
        Err(NoiseError::Decrypt)
    ));
    assert!(matches!(
        a.read_message(&msg2[..40], &mut known),
        Err(NoiseError::Frame(_))
    ));
    msg2[50] ^= 1;
    a.read_message(&msg2, &mut known).expect("real msg 2");
    assert!(a.remote_identity().is_some());
}

#[test]
fn debug_never_prints_secrets() {
    let id = identity(0xab);
    let text = format!("{id:?}");
    assert!(!text.contains("abab"), "{text}");
    let pair = Pair::new(TransportLimits::default());
    let text = format!("{:?}", pair.a);
    assert!(text.contains("send_epoch"), "{text}");
}

#[test]
fn rekey_by_message_count() {
    let mut pair = Pair::new(small_rekey(10));
    let mut frames = Vec::new();
    for i in 0..100u32 {
        let frame = pair.a_seal(&i.to_be_bytes());
        frames.push(frame.clone());
        if i % 10 == 9 {
            continue; // Hold back the last frame of each epoch: it arrives late.
        }
        assert_eq!(pair.b_open(&frame).expect("in order"), i.to_be_bytes());
        assert_eq!(pair.b.recv_epoch(), i / 10);
        if i % 10 == 0 && i >= 10 {
            // The held-back frame of the previous epoch is still accepted.
            let late = &frames[usize::try_from(i).expect("small") - 1];
            assert_eq!(
                pair.b_open(late).expect("late, previous epoch"),
                (i - 1).to_be_bytes()
            );
        }
    }
    assert_eq!(pair.a.send_epoch(), 9);
    assert_eq!(pair.b.recv_epoch(), 9);
    // Epoch 7 is two back: rejected.
    assert!(matches!(
        pair.b_open(&frames[75]),
        Err(NoiseError::UnknownEpoch)
    ));
    // Epoch 8 (the previous) still has its window: replays are refused.
    assert!(matches!(
        pair.b_open(&frames[85]),
        Err(NoiseError::Replayed)
    ));
    assert!(matches!(
        pair.b_open(&frames[89]),
        Err(NoiseError::Replayed)
    ));
    // The held-back last frame of the current epoch arrives late.
    assert_eq!(pair.b_open(&frames[99]).expect("late"), 99u32.to_be_bytes());
}

/// Frames per epoch in the epoch-skip tests.
const PER_EPOCH: u32 = 3;

/// Seals `PER_EPOCH` frames for each of the epochs `0..epochs`; `frames[e][i]` is the `i`-th
/// frame of epoch `e` and carries `[e, i]`.
fn seal_epochs(pair: &mut Pair, epochs: u32) -> Vec<Vec<Vec<u8>>> {
    (0..epochs)
        .map(|epoch| {
            (0..PER_EPOCH)
                .map(|i| {
                    let frame = pair.a_seal(&payload(epoch, i));
                    assert_eq!(&frame[1..5], &epoch.to_be_bytes());
                    frame
                })
                .collect()
        })
        .collect()
}

fn payload(epoch: u32, i: u32) -> Vec<u8> {
    [epoch, i].map(|x| u8::try_from(x).expect("small")).to_vec()
}

/// Every frame of epochs `1..skip` is lost; the first frame of epoch `skip` still opens.
fn jump_is_accepted(skip: u32) {
    let mut pair = Pair::new(small_rekey(PER_EPOCH.into()));
    let frames = seal_epochs(&mut pair, skip + 2);
    let index = |x: u32| usize::try_from(x).expect("small");
    let at = |e: u32, i: u32| &frames[index(e)][index(i)];

    assert_eq!(pair.b_open(at(0, 0)).expect("epoch 0"), payload(0, 0));
    assert_eq!(pair.b_open(at(skip, 0)).expect("jump"), payload(skip, 0));
    assert_eq!(pair.b.recv_epoch(), skip);
    // Late frames of the old current epoch still open, once.
    for i in 1..PER_EPOCH {
        assert_eq!(pair.b_open(at(0, i)).expect("late"), payload(0, i));
        assert!(matches!(pair.b_open(at(0, i)), Err(NoiseError::Replayed)));
    }
    assert!(matches!(pair.b_open(at(0, 0)), Err(NoiseError::Replayed)));
    // Skipped epochs have no key: their frames are dropped if they turn up after all.
    for e in 1..skip {
        assert!(matches!(
            pair.b_open(at(e, 0)),
            Err(NoiseError::UnknownEpoch)
        ));
    }
    // The new epoch has a fresh window, and the next shift (a jump of one) works as before.
    assert!(matches!(
        pair.b_open(at(skip, 0)),
        Err(NoiseError::Replayed)
    ));
    assert_eq!(
        pair.b_open(at(skip, 2)).expect("new epoch"),
        payload(skip, 2)
    );
    assert_eq!(
        pair.b_open(at(skip + 1, 0)).expect("next"),
        payload(skip + 1, 0)
    );
    assert_eq!(pair.b.recv_epoch(), skip + 1);
    assert_eq!(pair.b_open(at(skip, 1)).expect("late"), payload(skip, 1));
    // Epoch 0 is no longer the previous one.
    assert!(matches!(
        pair.b_open(at(0, 1)),
        Err(NoiseError::UnknownEpoch)
    ));
    assert_eq!(pair.b.recv_epoch(), skip + 1);
}

#[test]
fn jump_of_two_epochs_is_accepted() {
    jump_is_accepted(2);
}

#[test]
fn jump_of_max_epoch_skip_is_accepted() {
    jump_is_accepted(MAX_EPOCH_SKIP);
}

#[test]
fn jump_beyond_max_epoch_skip_is_rejected() {
    let mut pair = Pair::new(small_rekey(PER_EPOCH.into()));
    let frames = seal_epochs(&mut pair, MAX_EPOCH_SKIP + 2);
    let too_far = usize::try_from(MAX_EPOCH_SKIP + 1).expect("small");
    for frame in &frames[too_far] {
        assert!(matches!(pair.b_open(frame), Err(NoiseError::UnknownEpoch)));
    }
    assert_eq!(pair.b.recv_epoch(), 0);
    assert_eq!(pair.b.stats().dropped, u64::from(PER_EPOCH));
    // Nothing moved: epoch 0 and a jump of exactly MAX_EPOCH_SKIP still work.
    assert_eq!(pair.b_open(&frames[0][0]).expect("epoch 0"), payload(0, 0));
    let max = usize::try_from(MAX_EPOCH_SKIP).expect("small");
    assert_eq!(
        pair.b_open(&frames[max][0]).expect("jump"),
        payload(MAX_EPOCH_SKIP, 0)
    );
    // Measured from the new current epoch, MAX_EPOCH_SKIP + 1 is now one ahead.
    assert_eq!(
        pair.b_open(&frames[too_far][0]).expect("one ahead"),
        payload(MAX_EPOCH_SKIP + 1, 0)
    );
}

#[test]
fn forged_frame_of_a_later_epoch_moves_nothing() {
    let mut pair = Pair::new(small_rekey(PER_EPOCH.into()));
    let frames = seal_epochs(&mut pair, 5);
    pair.b_open(&frames[0][0]).expect("epoch 0");
    pair.b_open(&frames[1][0]).expect("epoch 1");
    assert_eq!(pair.b.recv_epoch(), 1);

    // A frame of the current epoch relabelled as current + 3.
    let mut relabelled = frames[1][1].clone();
    relabelled[1..5].copy_from_slice(&4u32.to_be_bytes());
    // A genuine frame of epoch current + 3 with one ciphertext bit flipped.
    let mut flipped = frames[4][0].clone();
    flipped[13] ^= 1;
    // A frame of the current epoch with a forged tag, relabelled as current + 3.
    let mut bad_tag = frames[1][2].clone();
    bad_tag[1..5].copy_from_slice(&4u32.to_be_bytes());
    let last = bad_tag.len() - 1;
    bad_tag[last] ^= 0x80;
    for forged in [&relabelled, &flipped, &bad_tag] {
        assert!(matches!(pair.b_open(forged), Err(NoiseError::Decrypt)));
        let mut copy = forged.clone();
        assert!(matches!(
            pair.b.open_in_place(pair.clock.now(), &mut copy),
            Err(NoiseError::Decrypt)
        ));
        assert_eq!(pair.b.recv_epoch(), 1);
    }
    assert_eq!(pair.b.stats().dropped, 6);

    // The genuine frames still open: current, previous, and the real next epochs in order.
    assert_eq!(pair.b_open(&frames[1][1]).expect("current"), payload(1, 1));
    assert_eq!(pair.b_open(&frames[0][1]).expect("previous"), payload(0, 1));
    assert_eq!(pair.b_open(&frames[2][0]).expect("next"), payload(2, 0));
    assert_eq!(pair.b_open(&frames[3][0]).expect("next"), payload(3, 0));
    assert_eq!(pair.b_open(&frames[4][0]).expect("next"), payload(4, 0));
    assert_eq!(pair.b.recv_epoch(), 4);
}

#[test]
fn jump_to_the_last_epoch_does_not_wrap() {
    let mut pair = Pair::new(small_rekey(1));
    // Both sides start from the same key; only the epoch labels are moved.
    pair.a.force_send_state(u32::MAX - 3, 0);
    pair.b.force_recv_epoch(u32::MAX - 3);
    let first = pair.a_seal(b"a");
    pair.b_open(&first).expect("start");
    let _lost = pair.a_seal(b"b");
    let _lost = pair.a_seal(b"c");
    let last = pair.a_seal(b"d");
    assert_eq!(pair.a.send_epoch(), u32::MAX);
    assert_eq!(pair.b_open(&last).expect("jump of 3"), b"d");
    assert_eq!(pair.b.recv_epoch(), u32::MAX);
    // Epochs past u32::MAX would wrap to 0..MAX_EPOCH_SKIP: never accepted.
    let mut wrapped = last.clone();
    wrapped[1..5].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(
        pair.b_open(&wrapped),
        Err(NoiseError::UnknownEpoch)
    ));
    assert_eq!(pair.b.recv_epoch(), u32::MAX);
}

#[test]
fn rekey_by_age() {
    let mut pair = Pair::new(TransportLimits::default());
    let frame = pair.a_seal(b"0");
    pair.b_open(&frame).expect("epoch 0");
    pair.clock.advance(Duration::from_secs(119));
    let frame = pair.a_seal(b"1");
    assert_eq!(pair.a.send_epoch(), 0);
    pair.b_open(&frame).expect("still epoch 0");
    pair.clock.advance(Duration::from_secs(1));
    let frame = pair.a_seal(b"2");
    assert_eq!(pair.a.send_epoch(), 1);
    assert_eq!(pair.a.send_counter(), 1);
    pair.b_open(&frame).expect("epoch 1");
    assert_eq!(pair.b.recv_epoch(), 1);
    // The key's age restarts at the rekey.
    pair.clock.advance(Duration::from_secs(100));
    let _ = pair.a_seal(b"3");
    assert_eq!(pair.a.send_epoch(), 1);
}

#[test]
fn epoch_exhaustion() {
    let mut pair = Pair::new(small_rekey(2));
    pair.a.force_send_state(u32::MAX - 1, 0);
    pair.b.force_recv_epoch(u32::MAX - 1);
    let mut frames = Vec::new();
    for i in 0..4u8 {
        let frame = pair.a_seal(&[i]);
        assert_eq!(pair.b_open(&frame).expect("near the end"), [i]);
        frames.push(frame);
    }
    assert_eq!(pair.a.send_epoch(), u32::MAX);
    assert_eq!(pair.b.recv_epoch(), u32::MAX);
    let mut out = [0u8; 64];
    assert!(matches!(
        pair.a.seal(pair.clock.now(), b"x", &mut out),
        Err(NoiseError::EpochExhausted)
    ));
    // The receiver never wraps around to epoch 0 either.
    let mut wrapped = frames[0].clone();
    wrapped[1..5].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(
        pair.b_open(&wrapped),
        Err(NoiseError::UnknownEpoch)
    ));
}

#[test]
fn counter_never_reaches_the_reserved_value() {
    let limits = small_rekey(u64::MAX - 1);
    assert!(limits.validate().is_ok());
    let mut pair = Pair::new(limits);
    pair.a.force_send_state(0, u64::MAX - 3);
    for expected in [u64::MAX - 3, u64::MAX - 2] {
        let frame = pair.a_seal(b"x");
        assert_eq!(
            u64::from_be_bytes(frame[5..13].try_into().expect("8")),
            expected
        );
        pair.b_open(&frame).expect("high counters are fine");
    }
    // The limit is reached: rekey instead of using 2^64 − 2 or 2^64 − 1.
    let frame = pair.a_seal(b"x");
    assert_eq!(pair.a.send_epoch(), 1);
    assert_eq!(&frame[5..13], &0u64.to_be_bytes());
    pair.b_open(&frame).expect("next epoch");

    // Even with limits that skip validation, the counter stops short of 2^64 − 1.
    pair.a.force_limits(small_rekey(u64::MAX));
    pair.a.force_send_state(1, u64::MAX - 1);
    let mut out = [0u8; 64];
    assert!(matches!(
        pair.a.seal(pair.clock.now(), b"x", &mut out),
        Err(NoiseError::CounterExhausted)
    ));
}

#[test]
fn session_max_age() {
    let mut pair = Pair::new(TransportLimits::default());
    let frame = pair.a_seal(b"before");
    pair.clock.advance(Duration::from_secs(24 * 3600 - 1));
    let late = pair.a_seal(b"just in time");
    pair.b_open(&late).expect("within max age");
    pair.clock.advance(Duration::from_secs(1));
    assert!(pair.a.is_expired(pair.clock.now()));
    let mut out = [0u8; 64];
    assert!(matches!(
        pair.a.seal(pair.clock.now(), b"x", &mut out),
        Err(NoiseError::SessionExpired)
    ));
    assert!(matches!(
        pair.b_open(&frame),
        Err(NoiseError::SessionExpired)
    ));
}

#[test]
fn limits_validation() {
    assert!(TransportLimits::default().validate().is_ok());
    for bad in [
        small_rekey(0),
        small_rekey(u64::MAX),
        TransportLimits {
            rekey_after: Duration::ZERO,
            ..TransportLimits::default()
        },
        TransportLimits {
            max_age: Duration::ZERO,
            ..TransportLimits::default()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(NoiseError::InvalidLimits(_))),
            "{bad:?}"
        );
    }
}
