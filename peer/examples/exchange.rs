//! Two peers of one session, in one process, exchange a message through a relay.
//!
//! ```text
//! ferry-peer keygen --out alice.key; ferry-peer keygen --out bob.key
//! ferry-peer create --gateway URL --ca CA --identity alice.key --expect-peer "$(ferry-peer pubkey bob.key)" --out a.grant
//! ferry-peer join --gateway URL --ca CA --identity bob.key --code CODE --out b.grant
//! cargo run -p ferry-peer --example exchange -- a.grant alice.key b.grant bob.key [RELAY] [MESSAGE]
//! ```
//!
//! Each peer binds its slot with its grant (on the grant's relay, or on `RELAY` if given), pins
//! the other peer's key the grant names, and runs the Noise handshake through the relay (A
//! initiates, B answers). Then A sends `MESSAGE` (default `hello through the relay`), B sends
//! it back, and both lines are printed.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use ferry_core::keys::PeerStaticKey;
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::wire::Slot;
use ferry_peer::bind::BindClient;
use ferry_peer::channel::Channel;
use ferry_peer::gateway::Grant;
use ferry_peer::udp::UdpPeer;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A peer, not yet bound, for `grant` and the identity in `key_file`, on a fresh UDP socket.
fn peer(grant_file: &str, key_file: &str, relay: Option<SocketAddr>) -> anyhow::Result<UdpPeer> {
    let text =
        std::fs::read_to_string(grant_file).with_context(|| format!("reading {grant_file}"))?;
    let grant = Grant::from_json(&text).with_context(|| format!("reading {grant_file}"))?;
    let key: PeerStaticKey = ferry_keyfile::load_secret_file(Path::new(key_file))?;
    let identity = LocalIdentity::from_secret_bytes(*key.secret_bytes());
    let Some(expected) = grant.expected_peer_public_key else {
        bail!("{grant_file} names no peer to pin: create the session with --expect-peer");
    };
    let expectation = PeerExpectation::Pinned(*expected.as_bytes());
    let limits = TransportLimits::default();
    let channel = match grant.slot {
        Slot::A => Channel::initiator(&identity, expectation, grant.session_id, limits)?,
        Slot::B => Channel::responder(&identity, expectation, grant.session_id, limits)?,
    };
    let relay = relay.unwrap_or(grant.relay.address);
    let local: SocketAddr = if relay.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let socket = UdpSocket::bind(local).context("binding a UDP socket")?;
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_micros() as u64;
    let bind = BindClient::new(
        grant.session_id,
        grant.slot,
        *grant.token,
        &grant.slot_secret,
        start,
    );
    Ok(UdpPeer::new(
        socket,
        relay,
        bind,
        channel,
        KnownPeers::new(),
    ))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [grant_a, key_a, grant_b, key_b, rest @ ..] = args.as_slice() else {
        bail!("usage: exchange A.grant A.key B.grant B.key [RELAY] [MESSAGE]");
    };
    let relay = rest
        .first()
        .map(|r| {
            r.parse::<SocketAddr>()
                .with_context(|| format!("relay address {r:?}"))
        })
        .transpose()?;
    let message = rest
        .get(1)
        .map_or("hello through the relay", String::as_str);
    let mut a = peer(grant_a, key_a, relay)?;
    let mut b = peer(grant_b, key_b, relay)?;
    // Both slots are bound before the handshake starts (A's bind may end before B's begins).
    a.bind(TIMEOUT).context("A's bind")?;
    b.bind(TIMEOUT).context("B's bind")?;
    std::thread::scope(|s| {
        let responder = s.spawn(|| b.handshake(TIMEOUT));
        // A's failure (e.g. B is not the peer A pins) is the cause of B's: report it first.
        let initiator = a.handshake(TIMEOUT).context("A's handshake");
        let responder = responder
            .join()
            .map_err(|_| anyhow::anyhow!("B's handshake panicked"))?
            .context("B's handshake");
        initiator.and(responder)
    })?;
    a.send(message.as_bytes())?;
    let got = b.recv_message(TIMEOUT).context("B receiving")?;
    println!("B got: {}", String::from_utf8_lossy(&got));
    b.send(&got)?;
    let back = a.recv_message(TIMEOUT).context("A receiving")?;
    println!("A got back: {}", String::from_utf8_lossy(&back));
    ensure!(back == message.as_bytes(), "the message came back changed");
    a.close()?;
    b.close()?;
    Ok(())
}
