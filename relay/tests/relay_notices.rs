//! The real `ferry-relay` process on loopback tells peers what happens to their bindings: the
//! first peer of a session hears when the second binds (an unsolicited BIND-ACK with *peer
//! present*), and a peer whose slot is reaped gets an authenticated CLOSE saying why (idle, or
//! its token expired), over UDP, through the io_uring workers. Peers are `BindClient`s driven
//! over plain sockets, so every datagram they get is checked.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_core::token::MintedToken;
use ferry_core::wire::{CloseReason, MAX_DATAGRAM, Slot};
use ferry_peer::bind::{BindClient, BindEvent, BindState};
use ferry_testkit::fixtures::Authority;
use ferry_testkit::metrics::metric;
use ferry_testkit::micros_now;
use ferry_testkit::relay::{RelayConfig, RelayProcess};

/// The relay with the shortest idle timeout its config allows (5 s), and no clock skew, so
/// that a slot goes at its token's `exp`.
fn start_relay(auth: &Authority) -> RelayProcess {
    let config = RelayConfig {
        sections: "[xdp]\nmode = \"off\"\n\n[limits]\nidle_timeout_secs = 5\n\
                   max_clock_skew_secs = 0\n"
            .into(),
        ..RelayConfig::loopback(vec![auth.gateway_key()]).unwrap()
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-relay"));
    RelayProcess::start(bin, &auth.relay_key, &config).unwrap()
}

/// A peer: its socket and its binding.
struct Peer {
    socket: UdpSocket,
    relay: SocketAddr,
    client: BindClient,
    out: Vec<u8>,
    inbuf: Vec<u8>,
}

impl Peer {
    fn new(relay: SocketAddr, session: u64, slot: Slot, token: &MintedToken) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = BindClient::new(session, slot, token.bytes, &token.slot_secret, micros_now());
        Self {
            socket,
            relay,
            client,
            out: vec![0; MAX_DATAGRAM],
            inbuf: vec![0; MAX_DATAGRAM],
        }
    }

    fn send(&self, n: usize) {
        self.socket.send_to(&self.out[..n], self.relay).unwrap();
    }

    /// The client's reading of the next datagram from the relay before `deadline` (a
    /// CHALLENGE is answered and not returned); `None` at the deadline.
    fn next_event(&mut self, deadline: Instant) -> Option<BindEvent> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            let Ok((len, from)) = self.socket.recv_from(&mut self.inbuf) else {
                return None;
            };
            assert_eq!(from, self.relay);
            match self
                .client
                .handle(Instant::now(), &self.inbuf[..len], &mut self.out)
            {
                BindEvent::Transmit(n) => self.send(n),
                event => return Some(event),
            }
        }
    }

    /// Binds, through the CHALLENGE; returns whether the other slot was bound.
    fn bind(&mut self) -> bool {
        let n = self.client.start(Instant::now(), &mut self.out).unwrap();
        self.send(n);
        let deadline = Instant::now() + Duration::from_secs(5);
        match self.next_event(deadline) {
            Some(BindEvent::Bound { peer_present }) => peer_present,
            other => panic!("expected a BIND-ACK, got {other:?}"),
        }
    }
}

#[test]
fn the_first_peer_hears_of_the_second_and_idle_peers_are_told_why_they_go() {
    let auth = Authority::new().unwrap();
    let relay = start_relay(&auth);
    let session = 0x0a0b_0c0d;
    let token_a = auth.mint(session, Slot::A, 600).unwrap();
    let token_b = auth.mint(session, Slot::B, 600).unwrap();
    let mut a = Peer::new(relay.listen, session, Slot::A, &token_a);
    let mut b = Peer::new(relay.listen, session, Slot::B, &token_b);

    assert!(!a.bind(), "A binds first");
    assert!(!a.client.peer_present());
    assert!(b.bind(), "A is bound when B binds");
    // A did not ask, but the relay tells it.
    let soon = Instant::now() + Duration::from_secs(2);
    assert_eq!(a.next_event(soon), Some(BindEvent::PeerPresent));
    assert!(a.client.peer_present());
    assert_eq!(a.client.state(), BindState::Bound);

    // Neither peer sends anything: after the 5 s idle timeout (and a reap pass, once a
    // second) each gets a CLOSE saying so.
    let bound_at = Instant::now();
    let later = bound_at + Duration::from_secs(9);
    for peer in [&mut a, &mut b] {
        assert_eq!(
            peer.next_event(later),
            Some(BindEvent::Closed {
                reason: CloseReason::Idle
            })
        );
        assert_eq!(peer.client.state(), BindState::Closed);
    }
    assert!(
        bound_at.elapsed() >= Duration::from_secs(4),
        "not before the idle timeout: {:?}",
        bound_at.elapsed()
    );
    let page = relay.metrics();
    assert_eq!(
        metric(&page, "ferry_notices_total{kind=\"peer_present\"}"),
        1
    );
    assert_eq!(metric(&page, "ferry_notices_total{kind=\"idle\"}"), 2);
    assert_eq!(metric(&page, "ferry_notices_total{kind=\"expired\"}"), 0);
    assert_eq!(metric(&page, "ferry_reaped_total"), 2);
    assert_eq!(metric(&page, "ferry_sessions_active"), 0);
}

#[test]
fn a_peer_kept_alive_past_its_token_is_told_it_expired() {
    let auth = Authority::new().unwrap();
    let relay = start_relay(&auth);
    let session = 0x0e0f_1011;
    let token = auth.mint(session, Slot::A, 3).unwrap();
    // `exp` is in whole seconds: at least two of the three are still to come.
    let earliest = Instant::now() + Duration::from_secs(2);
    let mut a = Peer::new(relay.listen, session, Slot::A, &token);
    assert!(!a.bind());
    // KEEPALIVEs every half second keep the slot from idling; only the token runs out.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut closed = None;
    while closed.is_none() {
        assert!(Instant::now() < deadline, "no CLOSE came");
        let n = ferry_core::wire::encode_keepalive(&mut a.out, session).unwrap();
        a.send(n);
        let tick = Instant::now() + Duration::from_millis(500);
        while let Some(event) = a.next_event(tick) {
            match event {
                BindEvent::KeepaliveEcho => {}
                BindEvent::Closed { reason } => {
                    closed = Some(reason);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(closed, Some(CloseReason::Expired));
    assert!(Instant::now() >= earliest, "not before exp");
    assert_eq!(a.client.state(), BindState::Closed);
    let page = relay.metrics();
    assert_eq!(metric(&page, "ferry_notices_total{kind=\"expired\"}"), 1);
    assert_eq!(metric(&page, "ferry_notices_total{kind=\"idle\"}"), 0);
}
