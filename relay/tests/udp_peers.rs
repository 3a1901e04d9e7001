//! Two real UDP peers through the relay's session logic on loopback, driven by a plain
//! blocking socket loop: the peers' blocking driver and the session tables against real
//! sockets, without io_uring (the worker tests cover that).
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ferry_core::proof::CookieJar;
use ferry_core::time::UnixTime;
use ferry_core::token::{TokenVerifier, VerifierConfig};
use ferry_relay::limits::IpLimits;
use ferry_relay::session::{Outcome, SessionLimits};
use ferry_relay::shards::Sessions;

use ferry_testkit::fixtures::{Authority, KID, RELAY_ID};
use ferry_testkit::peers::{peer_pair, talk};

#[test]
fn peers_bind_handshake_and_talk_through_a_socket_relay() {
    let auth = Authority::new().unwrap();
    let mut verifier =
        TokenVerifier::new(VerifierConfig::new(RELAY_ID), auth.relay_key.clone()).unwrap();
    verifier.add_trusted_key(KID, auth.minter.public());
    let sessions = Sessions::new(
        SessionLimits::default(),
        IpLimits::default(),
        verifier,
        CookieJar::generate(&auth.rng).unwrap(),
    );
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = socket.local_addr().unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let relay_thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut buf, mut reply) = (vec![0u8; 2048], vec![0u8; 2048]);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let wall = UnixTime::from(SystemTime::now());
                match sessions.handle(Instant::now(), wall, from, None, &buf[..n], &mut reply) {
                    Outcome::Forward { to, .. } => drop(socket.send_to(&buf[..n], to)),
                    Outcome::Reply { to, len, .. } => drop(socket.send_to(&reply[..len], to)),
                    Outcome::ReplyAndNotify {
                        to,
                        len,
                        notify,
                        notice_len,
                        ..
                    } => {
                        drop(socket.send_to(&reply[..len], to));
                        drop(socket.send_to(&reply[len..len + notice_len], notify));
                    }
                    Outcome::Consumed | Outcome::Drop(_) => {}
                }
            }
            sessions.counters()
        })
    };

    let any = || UdpSocket::bind("127.0.0.1:0").unwrap();
    let (mut a, mut b) = peer_pair(&auth, 0xabc, relay, any(), any()).unwrap();
    assert!(!a.bind(Duration::from_secs(5)).unwrap());
    assert!(b.bind(Duration::from_secs(5)).unwrap());
    talk(&mut a, &mut b, 50).unwrap();
    assert!(a.keepalive(Duration::from_secs(2)).unwrap());

    // NAT rebinding: A moves to a new socket and proves it with a REBIND.
    a.set_socket(UdpSocket::bind("127.0.0.1:0").unwrap());
    assert!(a.bind(Duration::from_secs(5)).unwrap());
    a.send(b"after the move").unwrap();
    assert_eq!(
        b.recv_message(Duration::from_secs(5)).unwrap(),
        b"after the move"
    );

    a.close().unwrap();
    assert!(matches!(
        b.recv_message(Duration::from_secs(5)),
        Err(ferry_peer::udp::UdpPeerError::Closed)
    ));
    stop.store(true, Ordering::Relaxed);
    let counters = relay_thread.join().unwrap();
    assert_eq!(
        counters.forwarded,
        4 + 100 + 1,
        "handshake (three messages and the confirmation), 50 each way, one after the move"
    );
    assert_eq!(counters.rebinds_accepted, 1);
    assert_eq!(counters.closed, 1);
}
