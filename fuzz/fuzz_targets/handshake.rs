//! Arbitrary bytes as handshake messages and TRANSPORT frames: nothing may panic.
//!
//! The first byte picks what the rest of the input is fed to:
//! 0: a fresh responder's message 1 (then message 3 if message 1 was accepted),
//! 1: the initiator's message 2 and the responder's message 3, after a genuine message 1,
//! 2: a sequence of `len (u16 BE) ‖ frame` TRANSPORT frames opened by an established session,
//! 3: the frame parser.
#![no_main]

use std::time::{Duration, Instant};

use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{
    Handshake, LocalIdentity, PeerExpectation, Transport, TransportLimits, frame,
};
use libfuzzer_sys::fuzz_target;

const SESSION: u64 = 42;

fn identities() -> (LocalIdentity, LocalIdentity) {
    (
        LocalIdentity::from_secret_bytes([1; 32]),
        LocalIdentity::from_secret_bytes([2; 32]),
    )
}

fn pair() -> Option<(Handshake, Handshake)> {
    let (a, b) = identities();
    let initiator = Handshake::initiator(&a, PeerExpectation::Pinned(*b.public()), SESSION).ok()?;
    let responder = Handshake::responder(
        &b,
        PeerExpectation::TrustOnFirstUse {
            name: "alice".into(),
        },
        SESSION,
    )
    .ok()?;
    Some((initiator, responder))
}

fn responder_reads(input: &[u8]) {
    let Some((_, mut responder)) = pair() else {
        return;
    };
    let mut known = KnownPeers::new();
    if responder.read_message(input, &mut known).is_ok() {
        let mut out = [0u8; 256];
        let _ = responder.write_message(&mut out);
        let _ = responder.read_message(input, &mut known);
    }
}

fn after_message_1(input: &[u8]) {
    let Some((mut initiator, mut responder)) = pair() else {
        return;
    };
    let mut known = KnownPeers::new();
    let mut buf = [0u8; 256];
    let Ok(n) = initiator.write_message(&mut buf) else {
        return;
    };
    if responder.read_message(&buf[..n], &mut known).is_err() {
        return;
    }
    let Ok(n) = responder.write_message(&mut buf) else {
        return;
    };
    let _ = initiator.read_message(input, &mut known);
    let _ = responder.read_message(input, &mut known);
    let _ = initiator.read_message(&buf[..n], &mut known);
    let _ = responder.read_message(input, &mut known);
}

fn established() -> Option<Transport> {
    let (mut initiator, mut responder) = pair()?;
    let mut known = KnownPeers::new();
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        let (from, to) = match initiator.is_my_turn() {
            true => (&mut initiator, &mut responder),
            false => (&mut responder, &mut initiator),
        };
        let n = from.write_message(&mut buf).ok()?;
        to.read_message(&buf[..n], &mut known).ok()?;
    }
    let limits = TransportLimits {
        rekey_after_messages: 4,
        ..TransportLimits::default()
    };
    responder.into_transport(Instant::now(), limits).ok()
}

fn open_frames(mut input: &[u8]) {
    let Some(mut transport) = established() else {
        return;
    };
    let base = Instant::now();
    let mut out = [0u8; 2048];
    let mut step = 0u64;
    while let [hi, lo, rest @ ..] = input {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (frame, tail) = rest.split_at(len);
        let now = base + Duration::from_secs(step);
        let _ = transport.open(now, frame, &mut out);
        let mut copy = frame.to_vec();
        let _ = transport.open_in_place(now, &mut copy);
        let _ = transport.seal(now, frame, &mut out);
        input = tail;
        step += 30;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => responder_reads(rest),
        1 => after_message_1(rest),
        2 => open_frames(rest),
        _ => {
            let _ = frame::parse(rest);
        }
    }
});
