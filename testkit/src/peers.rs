//! Two peers of one session, with tokens from an [`Authority`], pinned to each other's
//! identity: the relay's tests, the live demo and the flood benchmark all start this way.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use ferry_core::keys::PeerStaticKey;
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::wire::Slot;
use ferry_peer::bind::BindClient;
use ferry_peer::channel::Channel;
use ferry_peer::udp::UdpPeer;

use crate::fixtures::Authority;
use crate::micros_now;

/// Peers A (initiator) and B (responder) of `session_id` on `socket_a` and `socket_b`, with
/// ten-minute tokens for relay `relay`, not yet bound.
pub fn peer_pair(
    auth: &Authority,
    session_id: u64,
    relay: SocketAddr,
    socket_a: UdpSocket,
    socket_b: UdpSocket,
) -> anyhow::Result<(UdpPeer, UdpPeer)> {
    peer_pair_via(auth, session_id, [relay, relay], socket_a, socket_b)
}

/// A [`peer_pair`] whose peers talk to the relay at different addresses: A at `relays[0]`, B
/// at `relays[1]` (a relay with several addresses).
pub fn peer_pair_via(
    auth: &Authority,
    session_id: u64,
    relays: [SocketAddr; 2],
    socket_a: UdpSocket,
    socket_b: UdpSocket,
) -> anyhow::Result<(UdpPeer, UdpPeer)> {
    let [id_a, id_b] = [
        PeerStaticKey::generate(&auth.rng)?,
        PeerStaticKey::generate(&auth.rng)?,
    ]
    .map(|key| LocalIdentity::from_secret_bytes(*key.secret_bytes()));
    let (pub_a, pub_b) = (*id_a.public(), *id_b.public());
    let token_a = auth.mint(session_id, Slot::A, 600)?;
    let token_b = auth.mint(session_id, Slot::B, 600)?;
    let limits = TransportLimits::default();
    let responder = Channel::responder(&id_b, PeerExpectation::Pinned(pub_a), session_id, limits)?;
    let initiator = Channel::initiator(&id_a, PeerExpectation::Pinned(pub_b), session_id, limits)?;
    let a = UdpPeer::new(
        socket_a,
        relays[0],
        BindClient::new(
            session_id,
            Slot::A,
            token_a.bytes,
            &token_a.slot_secret,
            micros_now(),
        ),
        initiator,
        KnownPeers::new(),
    );
    let b = UdpPeer::new(
        socket_b,
        relays[1],
        BindClient::new(
            session_id,
            Slot::B,
            token_b.bytes,
            &token_b.slot_secret,
            micros_now(),
        ),
        responder,
        KnownPeers::new(),
    );
    Ok((a, b))
}

/// Runs the Noise handshake between two bound peers through the relay: A initiates (again on
/// the channel's back-off until answered), B answers; each side gives up after ten seconds.
pub fn handshake(a: &mut UdpPeer, b: &mut UdpPeer) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let responder = s.spawn(|| b.handshake(Duration::from_secs(10)));
        let initiator = a
            .handshake(Duration::from_secs(10))
            .context("A's handshake");
        responder
            .join()
            .map_err(|_| anyhow::anyhow!("B's handshake thread panicked"))?
            .context("B's handshake")?;
        initiator
    })
}

/// The handshake, then `n` messages each way, each checked on arrival.
pub fn talk(a: &mut UdpPeer, b: &mut UdpPeer, n: u32) -> anyhow::Result<()> {
    handshake(a, b)?;
    for i in 0..n {
        let msg = format!("hello {i}");
        a.send(msg.as_bytes())?;
        let got = b
            .recv_message(Duration::from_secs(5))
            .context("B receiving")?;
        ensure!(got == msg.as_bytes(), "B got {got:?} for {msg:?}");
        b.send(msg.as_bytes())?;
        let got = a
            .recv_message(Duration::from_secs(5))
            .context("A receiving")?;
        ensure!(got == msg.as_bytes(), "A got {got:?} for {msg:?}");
    }
    Ok(())
}

/// A [`peer_pair`] for a fresh session on `relay`, both bound and through the handshake:
/// ready to exchange messages.
pub fn connected_pair(
    auth: &Authority,
    relay: SocketAddr,
    socket_a: UdpSocket,
    socket_b: UdpSocket,
) -> anyhow::Result<(UdpPeer, UdpPeer)> {
    let (mut a, mut b) = peer_pair(auth, micros_now(), relay, socket_a, socket_b)?;
    a.bind(Duration::from_secs(5)).context("A's bind")?;
    b.bind(Duration::from_secs(5)).context("B's bind")?;
    handshake(&mut a, &mut b)?;
    Ok((a, b))
}
