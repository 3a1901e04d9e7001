//! Shared set-up for the relay's integration tests: keys, tokens and peers.
#![allow(dead_code, clippy::unwrap_used)] // shared by several test crates; a failed unwrap fails the test

pub mod netns;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime};

use ferry_core::keys::{GatewaySigningKey, PeerStaticKey, RelayPublicKey, RelayStaticKey};
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter};
use ferry_core::wire::Slot;
use ferry_peer::bind::BindClient;
use ferry_peer::channel::Channel;
use ferry_peer::udp::UdpPeer;
use ring::rand::SystemRandom;

pub const RELAY_ID: u64 = 0x5e1a7;
pub const KID: u32 = 1;

/// A gateway and a relay key pair, as the gateway would hold them.
pub struct Authority {
    pub rng: SystemRandom,
    pub minter: TokenMinter,
    pub relay_key: RelayStaticKey,
    pub relay_public: RelayPublicKey,
}

impl Authority {
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let relay_key = RelayStaticKey::generate(&rng).unwrap();
        let relay_public = relay_key.public();
        let minter = TokenMinter::new(KID, GatewaySigningKey::generate(&rng).unwrap());
        Self {
            rng,
            minter,
            relay_key,
            relay_public,
        }
    }

    pub fn mint(&self, session_id: u64, slot: Slot, lifetime_secs: u64) -> MintedToken {
        let now = UnixTime::from(SystemTime::now());
        let input = ClaimsInput {
            slot,
            relay_id: RELAY_ID,
            session_id,
            not_before: now.saturating_sub(5),
            expires: now.saturating_add(lifetime_secs),
            rate_bytes_per_sec: 0,
        };
        self.minter
            .mint(&self.rng, &input, &self.relay_public)
            .unwrap()
    }
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Two peers of one session, pinned to each other's identity, bound to local sockets.
pub fn peer_pair(
    auth: &Authority,
    session_id: u64,
    relay: SocketAddr,
    local_a: SocketAddr,
    local_b: SocketAddr,
) -> (UdpPeer, UdpPeer, Box<dyn Fn() -> Channel>) {
    let key_a = PeerStaticKey::generate(&auth.rng).unwrap();
    let key_b = PeerStaticKey::generate(&auth.rng).unwrap();
    let id_a = LocalIdentity::from_secret_bytes(*key_a.secret_bytes());
    let id_b = LocalIdentity::from_secret_bytes(*key_b.secret_bytes());
    let pub_a = *id_a.public();
    let pub_b = *id_b.public();
    let token_a = auth.mint(session_id, Slot::A, 600);
    let token_b = auth.mint(session_id, Slot::B, 600);
    let limits = TransportLimits::default();
    let make_a = {
        let id_a = id_a.clone();
        move || {
            Channel::initiator(&id_a, PeerExpectation::Pinned(pub_b), session_id, limits).unwrap()
        }
    };
    let a = UdpPeer::new(
        UdpSocket::bind(local_a).unwrap(),
        relay,
        BindClient::new(
            session_id,
            Slot::A,
            token_a.bytes,
            &token_a.slot_secret,
            micros_now(),
        ),
        make_a(),
        KnownPeers::new(),
    );
    let b = UdpPeer::new(
        UdpSocket::bind(local_b).unwrap(),
        relay,
        BindClient::new(
            session_id,
            Slot::B,
            token_b.bytes,
            &token_b.slot_secret,
            micros_now(),
        ),
        Channel::responder(&id_b, PeerExpectation::Pinned(pub_a), session_id, limits).unwrap(),
        KnownPeers::new(),
    );
    (a, b, Box::new(make_a))
}

/// Runs a handshake and a few messages each way between a bound pair.
pub fn talk(a: &mut UdpPeer, b: &mut UdpPeer, make_a: &dyn Fn() -> Channel, n: u32) {
    std::thread::scope(|s| {
        s.spawn(|| {
            b.handshake(None, Duration::from_secs(1), Duration::from_secs(10))
                .unwrap()
        });
        let make = || Ok(make_a());
        a.handshake(
            Some(&make),
            Duration::from_millis(300),
            Duration::from_secs(10),
        )
        .unwrap();
    });
    for i in 0..n {
        let msg = format!("hello {i}");
        a.send(msg.as_bytes()).unwrap();
        assert_eq!(
            b.recv_message(Duration::from_secs(5)).unwrap(),
            msg.as_bytes()
        );
        b.send(msg.as_bytes()).unwrap();
        assert_eq!(
            a.recv_message(Duration::from_secs(5)).unwrap(),
            msg.as_bytes()
        );
    }
}
