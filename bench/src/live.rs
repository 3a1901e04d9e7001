//! The live demo: the real `ferry-relay` process (io_uring workers) on loopback with a config
//! generated on the spot, and two peers over real UDP sockets that bind with gateway tokens,
//! run the Noise handshake through it and exchange encrypted messages.

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, ensure};
use ferry_core::keys::PeerStaticKey;
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::wire::Slot;
use ferry_peer::bind::BindClient;
use ferry_peer::channel::Channel;
use ferry_peer::udp::UdpPeer;
use ring::rand::SystemRandom;

use crate::relay_process::{RelayProcess, metric, sum_metric};

/// What the live run measured.
#[derive(Clone, Debug)]
pub struct LiveReport {
    /// Messages that made the round trip A → relay → B → relay → A, authenticated both ways.
    pub round_trips: usize,
    /// Wall time of the exchange.
    pub elapsed: Duration,
    /// Datagrams the relay says it forwarded.
    pub forwarded: u64,
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// Runs the live demo with the relay binary at `relay_bin`.
pub fn run(relay_bin: &Path, messages: usize, payload: usize) -> anyhow::Result<LiveReport> {
    // Default limits except the per-slot budget, which the demo's back-to-back round trips
    // would exceed (1.25 MB/s by default).
    // The XDP guard needs root; as root it runs on loopback in generic mode (loopback has no
    // driver to run it natively), as it would on a NIC.
    let xdp = is_root().then_some("lo");
    let relay = RelayProcess::start(
        relay_bin,
        0,
        "",
        "[limits]\ndefault_session_rate = 1000000000\nmax_session_rate = 1000000000\n\n\
         [log]\nlevel = \"warn\"",
        xdp,
    )?;
    println!(
        "  ferry-relay running: UDP {} (io_uring), admin http://{}, XDP guard {}",
        relay.listen,
        relay.admin,
        match xdp {
            Some(_) => "on lo (generic mode)",
            None => "off (needs root)",
        }
    );
    let (mut alice, mut bob) = connected_pair(
        &relay,
        UdpSocket::bind("127.0.0.1:0")?,
        UdpSocket::bind("127.0.0.1:0")?,
    )?;
    println!("  both peers bound (BIND, CHALLENGE, BIND, BIND-ACK over UDP)");
    println!("  Noise XX handshake done through the relay; identities pinned on both sides");

    let message = vec![0x42u8; payload];
    let started = Instant::now();
    for _ in 0..messages {
        alice.send(&message)?;
        let got = bob.recv_message(Duration::from_secs(5))?;
        ensure!(got == message, "bob got a corrupted message");
        bob.send(&got)?;
        let back = alice.recv_message(Duration::from_secs(5))?;
        ensure!(back == message, "alice got a corrupted echo");
    }
    let elapsed = started.elapsed();
    alice.close()?;
    std::thread::sleep(Duration::from_millis(100));
    let page = relay.metrics();
    let forwarded = metric(&page, "ferry_forwarded_packets_total");
    println!(
        "  {messages} round trips of {payload} bytes in {:.3} s ({:.0} µs each, one message at a time)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / messages.max(1) as f64
    );
    println!(
        "  relay metrics: forwarded {forwarded}, binds accepted {}, sessions closed {}, drops {}",
        metric(&page, "ferry_binds_accepted_total"),
        metric(&page, "ferry_sessions_closed_total"),
        sum_metric(&page, "ferry_drops_total")
    );
    if xdp.is_some() {
        show_the_guard(&relay)?;
    }
    Ok(LiveReport {
        round_trips: messages,
        elapsed,
        forwarded,
    })
}

/// Whether this process runs as root (owns `/proc/self`), which loading XDP needs.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Sends the relay three datagrams that break the header rules and shows that the XDP guard
/// dropped them before the relay saw them.
fn show_the_guard(relay: &RelayProcess) -> anyhow::Result<()> {
    let before = relay.metrics();
    let stray = UdpSocket::bind("127.0.0.1:0")?;
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0u8; 8],
        &[0x46, 0x52, 9, 0, 1],
    ] {
        stray.send_to(garbage, relay.listen)?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = relay.metrics();
    let xdp_drops = |page: &str| sum_metric(page, "ferry_xdp_packets_total{action=\"drop\"");
    let dropped = xdp_drops(&after) - xdp_drops(&before);
    let relay_malformed = metric(&after, "ferry_drops_total{reason=\"malformed\"}")
        - metric(&before, "ferry_drops_total{reason=\"malformed\"}");
    ensure!(
        dropped == 3 && relay_malformed == 0,
        "the XDP guard should have dropped 3 malformed datagrams before the relay (it dropped \
         {dropped}, the relay saw {relay_malformed})"
    );
    println!(
        "  XDP guard: passed {} relay datagrams; dropped 3 malformed ones before the relay saw \
         them (too short, bad magic, bad version)",
        metric(
            &after,
            "ferry_xdp_packets_total{action=\"pass\",reason=\"relay\"}"
        )
    );
    Ok(())
}

/// Two peers on `socket_a` and `socket_b`, bound to a fresh session on `relay` with its
/// tokens, their Noise handshake done through it: ready to exchange messages.
pub fn connected_pair(
    relay: &RelayProcess,
    socket_a: UdpSocket,
    socket_b: UdpSocket,
) -> anyhow::Result<(UdpPeer, UdpPeer)> {
    let rng = SystemRandom::new();
    let session = micros_now();
    let ids = [
        PeerStaticKey::generate(&rng)?,
        PeerStaticKey::generate(&rng)?,
    ]
    .map(|k| LocalIdentity::from_secret_bytes(*k.secret_bytes()));
    let (pub_a, pub_b) = (*ids[0].public(), *ids[1].public());
    let limits = TransportLimits::default();
    let make_a = || Channel::initiator(&ids[0], PeerExpectation::Pinned(pub_b), session, limits);
    let token_a = relay.mint(session, Slot::A)?;
    let token_b = relay.mint(session, Slot::B)?;
    let mut alice = UdpPeer::new(
        socket_a,
        relay.listen,
        BindClient::new(
            session,
            Slot::A,
            token_a.bytes,
            &token_a.slot_secret,
            micros_now(),
        ),
        make_a()?,
        KnownPeers::new(),
    );
    let mut bob = UdpPeer::new(
        socket_b,
        relay.listen,
        BindClient::new(
            session,
            Slot::B,
            token_b.bytes,
            &token_b.slot_secret,
            micros_now(),
        ),
        Channel::responder(&ids[1], PeerExpectation::Pinned(pub_a), session, limits)?,
        KnownPeers::new(),
    );
    alice.bind(Duration::from_secs(5)).context("alice's bind")?;
    bob.bind(Duration::from_secs(5)).context("bob's bind")?;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let responder =
            s.spawn(|| bob.handshake(None, Duration::from_secs(1), Duration::from_secs(10)));
        let make = || make_a();
        alice.handshake(
            Some(&make),
            Duration::from_millis(300),
            Duration::from_secs(10),
        )?;
        responder
            .join()
            .map_err(|_| anyhow::anyhow!("the responder thread panicked"))??;
        Ok(())
    })?;
    Ok((alice, bob))
}
