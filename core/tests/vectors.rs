//! Test vectors for docs/protocol.md, appendix A: fixed inputs, pinned outputs. An independent
//! implementation checks itself against the same figures, so a change here is a change to the
//! protocol and must change the appendix too.

use std::net::SocketAddr;

use ferry_core::keys::RelayStaticKey;
use ferry_core::proof::{CookieJar, SlotKeys, SlotSecret};
use ferry_core::time::UnixTime;
use ferry_core::wire::{self, BindAckFields, RebindFields, Slot};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const SESSION: u64 = 0x1234_5678;

fn slot_keys() -> SlotKeys {
    SlotKeys::derive(&SlotSecret::from_bytes([0x11; 32]))
}

#[test]
fn relay_public_key() {
    let relay = RelayStaticKey::from_bytes(&[0x01; 32]);
    assert_eq!(hex(relay.public().as_bytes()), RELAY_PUBLIC);
}

#[test]
fn rebind_proof() {
    let keys = slot_keys();
    let fields = RebindFields {
        slot: Slot::B,
        bind_seq: 2,
        cookie: [0x44; 16],
    };
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let n = wire::encode_rebind(&mut buf, SESSION, &fields, |m| keys.peer.mac(m)).unwrap();
    assert_eq!(hex(&buf[..n]), REBIND.concat());
}

#[test]
fn bind_ack_mac() {
    let keys = slot_keys();
    let fields = BindAckFields {
        slot: Slot::B,
        peer_present: true,
        idle_timeout_secs: 60,
        bind_seq: 2,
        expires_at: 2_000,
    };
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let n = wire::encode_bind_ack(&mut buf, SESSION, &fields, |m| keys.relay.mac(m)).unwrap();
    assert_eq!(hex(&buf[..n]), BIND_ACK.concat());
}

#[test]
fn cookie() {
    let jar = CookieJar::new([0x55; 32]);
    let v4: SocketAddr = "198.18.0.1:4000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
    let now = UnixTime(1_800_000_000);
    let key = jar.window_key(1_800_000_000 / 60);
    let key_bytes = [key.k0.to_le_bytes(), key.k1.to_le_bytes()].concat();
    assert_eq!(hex(&key_bytes), COOKIE_WINDOW_KEY);
    assert_eq!(hex(&jar.issue(now, SESSION, 1, v4)), COOKIE_V4);
    assert_eq!(hex(&jar.issue(now, SESSION, 1, v6)), COOKIE_V6);
}

const RELAY_PUBLIC: &str = "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209";

const REBIND: [&str; 4] = [
    // header: magic, version 1, type 0x07, session 0x12345678, body length 44, reserved
    "465201070000000012345678002c0000",
    // slot B, reserved, bind sequence 2
    "010000000000000000000002",
    // cookie
    "44444444444444444444444444444444",
    // proof under K_peer
    "efe71721526822bbd6a0a2fb5c308da3",
];

const BIND_ACK: [&str; 4] = [
    // header: type 0x03, body length 40
    "46520103000000001234567800280000",
    // slot B, peer present, reserved, idle timeout 60
    "010100000000003c",
    // bind sequence 2, expires at 2000
    "000000000000000200000000000007d0",
    // MAC under K_relay
    "69e865386c954704d51f0d795bef25b1",
];

const COOKIE_WINDOW_KEY: &str = "3a1fb2811a606601305b9481772f99e2";
const COOKIE_V4: &str = "662afc3662180fa821d0329859ff865a";
const COOKIE_V6: &str = "bd4c489d281155c87616ab75ff671eda";
