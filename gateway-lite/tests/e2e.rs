//! End to end: a real `ferry-relay` process on 127.0.0.1 (XDP guard off: loopback) trusting
//! the gateway's signing key, a real `ferry-gateway` over HTTPS listing and probing it, and two
//! peers that get their tokens from the gateway — one creates the session, the other joins with
//! the join code — bind on the relay with them, run the Noise handshake through it and exchange
//! messages; and a session that outlives its tokens because both peers renew their slots
//! through the gateway, next to one that does not and is closed at its token's expiry; and
//! sessions that survive the loss of their bindings — a relay killed and started again, a slot
//! unbound for idleness — because the peers get fresh tokens from the gateway and bind again,
//! keeping their Noise session.
//!
//! Where the relay binary comes from: Cargo tells a test the path of its own package's binaries
//! only (`CARGO_BIN_EXE_*`), and artifact dependencies are not stable. So [`relay_binary`] runs
//! the same `cargo` that built this test (`env!("CARGO")`) to build `ferry-relay` with the same
//! profile into the same target directory, and uses the result. Under `cargo test --workspace`
//! that is a no-op check (the relay's own tests built it); under `cargo test -p ferry-gateway`
//! it builds the workspace's binaries once; and it can never pick up a stale binary left over
//! from an older build.
//! Cargo does not hold the target directory's lock while tests run, so the nested build
//! does not wait for the outer one.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use common::*;
use ferry_core::keys::{PeerPublicKey, PeerStaticKey};
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::proof::SlotSecret;
use ferry_core::time::UnixTime;
use ferry_core::token::TOKEN_LEN;
use ferry_core::wire::{self, CloseReason, Slot};
use ferry_peer::bind::{BindClient, BindEvent};
use ferry_peer::channel::Channel;
use ferry_peer::udp::{UdpPeer, UdpPeerError};
use ferry_testkit::metrics::metric;
use ferry_testkit::micros_now;
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use serde_json::json;

/// Builds (if needed) and returns the `ferry-relay` binary of this build's profile and target
/// directory; see the module doc.
fn relay_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        ferry_testkit::gateway::workspace_binary("ferry-relay", "ferry-relay")
            .unwrap_or_else(|e| panic!("building ferry-relay for the end-to-end test: {e:#}"))
    })
}

/// The config of a `ferry-relay` on 127.0.0.1 (its XDP guard off: loopback) trusting the
/// gateway's first signing key; `extra` adds config sections.
fn relay_config(setup: &Setup, extra: &str) -> RelayConfig {
    let (kid, signing) = &setup.signing[0];
    RelayConfig {
        sections: format!("[xdp]\nmode = \"off\"\n\n[log]\nlevel = \"info\"\n\n{extra}"),
        log_filter: "info".into(),
        ..RelayConfig::loopback(vec![(*kid, signing.public())]).unwrap()
    }
}

/// A `ferry-relay` with [`relay_config`] and the setup's relay key.
fn start_relay(setup: &Setup, extra: &str) -> RelayProcess {
    RelayProcess::start(
        relay_binary(),
        &setup.relay_key,
        &relay_config(setup, extra),
    )
    .unwrap()
}

/// The token and slot secret of a grant (`create`, `join` or `renew` answer).
fn credentials(grant: &serde_json::Value) -> ([u8; TOKEN_LEN], SlotSecret) {
    let token: [u8; TOKEN_LEN] = base64::engine::general_purpose::STANDARD
        .decode(grant["token"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let secret = SlotSecret::from_base64(grant["slot_secret"].as_str().unwrap()).unwrap();
    (token, secret)
}

/// What a peer needs from a grant (`create` or `join` answer) to bind.
fn bind_client(grant: &serde_json::Value, slot: Slot) -> (u64, SocketAddr, BindClient) {
    let session = u64::from_str_radix(grant["session_id"].as_str().unwrap(), 16).unwrap();
    let (token, secret) = credentials(grant);
    let relay: SocketAddr = grant["relay"]["address"].as_str().unwrap().parse().unwrap();
    let client = BindClient::new(session, slot, token, &secret, micros_now());
    (session, relay, client)
}

fn pinned(grant: &serde_json::Value) -> PeerExpectation {
    let key: PeerPublicKey = grant["expected_peer_public_key"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    PeerExpectation::Pinned(*key.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_get_tokens_from_the_gateway_bind_on_the_relay_and_talk() {
    let setup = Setup::new("e2e");
    let relay = tokio::task::block_in_place(|| start_relay(&setup, ""));
    let config = setup
        .config(1, "")
        .replace("127.0.0.1:7000", &relay.listen.to_string())
        .replace(
            "[relay_health]\nprobe = false\n",
            "[relay_health]\nprobe = true\ninterval_secs = 1\ntimeout_ms = 500\n",
        );
    let gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);

    let rng = ring::rand::SystemRandom::new();
    let alice_key = PeerStaticKey::generate(&rng).unwrap();
    let bob_key = PeerStaticKey::generate(&rng).unwrap();
    // Alice creates the session, naming Bob as the peer she expects.
    let (status, _, created) = post(
        &http,
        &gw.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({
            "peer_public_key": alice_key.public().to_string(),
            "expected_peer_public_key": bob_key.public().to_string(),
        }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["relay"]["address"], relay.listen.to_string());
    // Bob joins with the code Alice hands him (out of band), and learns her key.
    let (status, _, joined) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({
            "join_code": created["join_code"],
            "peer_public_key": bob_key.public().to_string(),
        }),
    )
    .await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(
        joined["expected_peer_public_key"],
        alice_key.public().to_string()
    );

    let exchanged = tokio::task::spawn_blocking(move || {
        let (session, relay_a, bind_a) = bind_client(&created, Slot::A);
        let (session_b, relay_b, bind_b) = bind_client(&joined, Slot::B);
        assert_eq!((session, relay_a), (session_b, relay_b));
        let alice_id = LocalIdentity::from_secret_bytes(*alice_key.secret_bytes());
        let bob_id = LocalIdentity::from_secret_bytes(*bob_key.secret_bytes());
        let limits = TransportLimits::default();
        let alice_expects = pinned(&created);
        let mut alice = UdpPeer::new(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            relay_a,
            bind_a,
            Channel::initiator(&alice_id, alice_expects, session, limits).unwrap(),
            KnownPeers::new(),
        );
        let mut bob = UdpPeer::new(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            relay_b,
            bind_b,
            Channel::responder(&bob_id, pinned(&joined), session, limits).unwrap(),
            KnownPeers::new(),
        );
        alice.bind(Duration::from_secs(5)).unwrap();
        assert!(bob.bind(Duration::from_secs(5)).unwrap(), "Alice is bound");
        std::thread::scope(|s| {
            let responder = s.spawn(|| bob.handshake(Duration::from_secs(10)));
            alice.handshake(Duration::from_secs(10)).unwrap();
            responder.join().unwrap().unwrap();
        });
        let mut exchanged = 0;
        for i in 0..10u8 {
            let message = vec![i; 100 + usize::from(i)];
            alice.send(&message).unwrap();
            assert_eq!(bob.recv_message(Duration::from_secs(5)).unwrap(), message);
            bob.send(&message[1..]).unwrap();
            assert_eq!(
                alice.recv_message(Duration::from_secs(5)).unwrap(),
                message[1..]
            );
            exchanged += 2;
        }
        alice.close().unwrap();
        exchanged
    })
    .await
    .unwrap();
    assert_eq!(exchanged, 20);

    // The relay says it bound both slots with the gateway's tokens and forwarded the traffic.
    let page = tokio::task::block_in_place(|| relay.metrics());
    assert_eq!(metric(&page, "ferry_binds_accepted_total"), 2, "{page}");
    // Two handshake messages and twenty transport messages at least.
    assert!(
        metric(&page, "ferry_forwarded_packets_total") >= 22,
        "{page}"
    );
    // The gateway granted both slots, and its probe found the real relay healthy.
    // A probe answers within its 500 ms timeout on an idle machine; on a loaded one (tests
    // run in parallel) one can miss it, so the relay is given a few probes to be seen healthy.
    let mut gw_page = String::new();
    for _ in 0..20 {
        gw_page = reqwest::get(gw.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&gw_page, "ferry_gateway_relays{health=\"healthy\"}") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(metric(&gw_page, "ferry_gateway_tokens_minted_total"), 2);
    assert_eq!(metric(&gw_page, "ferry_gateway_sessions_joined_total"), 1);
    assert_eq!(
        metric(&gw_page, "ferry_gateway_relays{health=\"healthy\"}"),
        1,
        "{gw_page}"
    );
    assert!(gw.stop().success());
}

fn wall_now() -> UnixTime {
    UnixTime::from(SystemTime::now())
}

/// How long the renewing peers keep talking: more than two token lifetimes of 30 s (the
/// gateway's minimum) plus the relay's 2 s of skew.
const TALK_FOR: Duration = Duration::from_secs(70);

/// One peer of the renewal test: its UDP peer, and how it asks the gateway for a fresh token.
struct Renewing<'a> {
    peer: UdpPeer,
    renew_body: serde_json::Value,
    gateway: &'a (dyn Fn(serde_json::Value) -> (u16, serde_json::Value) + Sync),
    renewals: u32,
}

impl Renewing<'_> {
    /// Renews the slot if due: a fresh token from the gateway, then a BIND with it.
    fn renew_if_due(&mut self) {
        if !self
            .peer
            .bind_client()
            .renew_due(Instant::now(), wall_now())
        {
            return;
        }
        let before = self.peer.bind_client().expires_at().unwrap();
        let (status, grant) = (self.gateway)(self.renew_body.clone());
        assert_eq!(status, 200, "{grant}");
        assert!(grant.get("join_code").is_none());
        let (token, secret) = credentials(&grant);
        self.peer
            .renew(token, &secret, Duration::from_secs(5))
            .unwrap();
        let after = self.peer.bind_client().expires_at().unwrap();
        assert_eq!(after.as_secs(), grant["expires_at"].as_u64().unwrap());
        assert!(after > before, "{after} after {before}");
        self.renewals += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_its_tokens_when_both_peers_renew_through_the_gateway() {
    let setup = Setup::new("e2e-renew");
    // A small clock skew, so that a slot is unbound 2 s after its token's exp.
    let relay =
        tokio::task::block_in_place(|| start_relay(&setup, "[limits]\nmax_clock_skew_secs = 2\n"));
    let config = setup
        .config(1, "[sessions]\ntoken_lifetime_secs = 30\n")
        .replace("127.0.0.1:7000", &relay.listen.to_string());
    let gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);
    let rng = ring::rand::SystemRandom::new();
    let alice_key = PeerStaticKey::generate(&rng).unwrap();
    let bob_key = PeerStaticKey::generate(&rng).unwrap();
    let (status, _, created) = post(
        &http,
        &gw.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({
            "peer_public_key": alice_key.public().to_string(),
            "expected_peer_public_key": bob_key.public().to_string(),
        }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["expires_at"].as_u64().unwrap() - created["not_before"].as_u64().unwrap(),
        30
    );
    let (status, _, joined) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({ "join_code": created["join_code"], "peer_public_key": bob_key.public().to_string() }),
    )
    .await;
    assert_eq!(status, 200, "{joined}");
    // The control: a session whose only peer never renews.
    let (status, _, lone) = post(
        &http,
        &gw.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({}),
    )
    .await;
    assert_eq!(status, 201, "{lone}");

    let runtime = tokio::runtime::Handle::current();
    let renew_url = gw.url("/v1/sessions/renew");
    let app_key = setup.key("app").to_string();
    let gateway = move |body: serde_json::Value| {
        let (status, _, answer) = runtime.block_on(post(&http, &renew_url, Some(&app_key), body));
        (status, answer)
    };
    let (renewals, exchanged, lone_closed_after) = tokio::task::spawn_blocking(move || {
        let (session, relay_addr, bind_a) = bind_client(&created, Slot::A);
        let (_, _, bind_b) = bind_client(&joined, Slot::B);
        let alice_id = LocalIdentity::from_secret_bytes(*alice_key.secret_bytes());
        let bob_id = LocalIdentity::from_secret_bytes(*bob_key.secret_bytes());
        let limits = TransportLimits::default();
        let mut alice = UdpPeer::new(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            relay_addr,
            bind_a,
            Channel::initiator(&alice_id, pinned(&created), session, limits).unwrap(),
            KnownPeers::new(),
        );
        let mut bob = UdpPeer::new(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            relay_addr,
            bind_b,
            Channel::responder(&bob_id, pinned(&joined), session, limits).unwrap(),
            KnownPeers::new(),
        );
        let session_hex = format!("{session:016x}");
        alice.bind(Duration::from_secs(5)).unwrap();
        assert!(bob.bind(Duration::from_secs(5)).unwrap());
        std::thread::scope(|s| {
            let responder = s.spawn(|| bob.handshake(Duration::from_secs(10)));
            alice.handshake(Duration::from_secs(10)).unwrap();
            responder.join().unwrap().unwrap();
        });
        let mut alice = Renewing {
            peer: alice,
            renew_body: json!({ "session_id": session_hex, "slot": "A" }),
            gateway: &gateway,
            renewals: 0,
        };
        let mut bob = Renewing {
            peer: bob,
            renew_body: json!({ "session_id": session_hex, "slot": "B" }),
            gateway: &gateway,
            renewals: 0,
        };

        std::thread::scope(|s| {
            // The control binds its slot and waits, without renewing, for what the relay says.
            let lone = s.spawn(|| {
                let (lone_session, _, mut bind) = bind_client(&lone, Slot::A);
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut out = vec![0u8; wire::MAX_DATAGRAM];
                let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
                let start = Instant::now();
                let n = bind.start(start, &mut out).unwrap();
                socket.send_to(&out[..n], relay_addr).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(1)))
                    .unwrap();
                loop {
                    assert!(
                        start.elapsed() < Duration::from_secs(45),
                        "no CLOSE EXPIRED"
                    );
                    let Ok((len, _)) = socket.recv_from(&mut buf) else {
                        if let Some(n) = bind.on_timeout(Instant::now(), &mut out) {
                            socket.send_to(&out[..n], relay_addr).unwrap();
                        }
                        continue;
                    };
                    match bind.handle(Instant::now(), &buf[..len], &mut out) {
                        BindEvent::Transmit(n) => {
                            socket.send_to(&out[..n], relay_addr).unwrap();
                        }
                        BindEvent::Closed { reason } => {
                            assert_eq!(reason, CloseReason::Expired);
                            assert_eq!(bind.session_id(), lone_session);
                            return start.elapsed();
                        }
                        _ => {}
                    }
                }
            });
            // Bob answers every message, renewing his slot when due.
            let responder = s.spawn(|| {
                let mut answered = 0u32;
                loop {
                    bob.renew_if_due();
                    let message = bob.peer.recv_message(Duration::from_secs(5)).unwrap();
                    if message == b"bye" {
                        return (bob.renewals, answered);
                    }
                    let mut reply = message.clone();
                    reply.reverse();
                    bob.peer.send(&reply).unwrap();
                    answered += 1;
                }
            });
            // Alice sends a numbered message every 200 ms and checks every answer.
            let start = Instant::now();
            let mut sent = 0u32;
            while start.elapsed() < TALK_FOR {
                alice.renew_if_due();
                let message = format!("message {sent} of a long session").into_bytes();
                alice.peer.send(&message).unwrap();
                let mut expected = message;
                expected.reverse();
                assert_eq!(
                    alice.peer.recv_message(Duration::from_secs(5)).unwrap(),
                    expected,
                    "answer to message {sent}"
                );
                sent += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            alice.peer.send(b"bye").unwrap();
            let (bob_renewals, answered) = responder.join().unwrap();
            assert_eq!(answered, sent, "no message lost");
            let lone_closed_after = lone.join().unwrap();
            alice.peer.close().unwrap();
            ((alice.renewals, bob_renewals), sent * 2, lone_closed_after)
        })
    })
    .await
    .unwrap();

    // Each slot was renewed at two thirds of each token's life: at about 20, 40 and 60 s.
    assert!(renewals.0 >= 3 && renewals.1 >= 3, "{renewals:?}");
    assert!(exchanged > 300, "{exchanged}");
    // The control's slot was unbound at its token's exp + 2 s (the relay reaps every second).
    assert!(
        (Duration::from_secs(30)..Duration::from_secs(36)).contains(&lone_closed_after),
        "{lone_closed_after:?}"
    );
    let page = tokio::task::block_in_place(|| relay.metrics());
    // Only the control was closed for expiry; the renewing slots never were.
    assert_eq!(
        metric(&page, "ferry_notices_total{kind=\"expired\"}"),
        1,
        "{page}"
    );
    // Two first binds, every renewal, and the control's bind.
    assert_eq!(
        metric(&page, "ferry_binds_accepted_total"),
        u64::from(renewals.0 + renewals.1) + 3,
        "{page}"
    );
    let gw_page = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&gw_page, "ferry_gateway_sessions_renewed_total"),
        u64::from(renewals.0 + renewals.1)
    );
    assert!(gw.stop().success());
}

/// Creates a session for Alice (naming Bob) and joins it for Bob; returns both grants.
async fn create_and_join(
    setup: &Setup,
    gw: &Gateway,
    http: &reqwest::Client,
    alice: &PeerStaticKey,
    bob: &PeerStaticKey,
) -> (serde_json::Value, serde_json::Value) {
    let (status, _, created) = post(
        http,
        &gw.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({
            "peer_public_key": alice.public().to_string(),
            "expected_peer_public_key": bob.public().to_string(),
        }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, _, joined) = post(
        http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({ "join_code": created["join_code"], "peer_public_key": bob.public().to_string() }),
    )
    .await;
    assert_eq!(status, 200, "{joined}");
    (created, joined)
}

/// One peer of the recovery tests: its UDP peer, and how it asks the gateway for a fresh token
/// for its slot once its binding is gone.
struct Recovering<'a> {
    peer: UdpPeer,
    renew_body: serde_json::Value,
    gateway: &'a (dyn Fn(serde_json::Value) -> (u16, serde_json::Value) + Sync),
    /// Why each binding ended: the error that said it was gone.
    ended: Vec<String>,
}

impl Recovering<'_> {
    /// Alice (slot A, initiator) and Bob (slot B, responder) of the grants, bound on the relay
    /// and with their Noise session established.
    fn pair<'a>(
        created: &serde_json::Value,
        joined: &serde_json::Value,
        alice_key: &PeerStaticKey,
        bob_key: &PeerStaticKey,
        gateway: &'a (dyn Fn(serde_json::Value) -> (u16, serde_json::Value) + Sync),
    ) -> (Recovering<'a>, Recovering<'a>) {
        let (session, relay_addr, bind_a) = bind_client(created, Slot::A);
        let (_, _, bind_b) = bind_client(joined, Slot::B);
        let alice_id = LocalIdentity::from_secret_bytes(*alice_key.secret_bytes());
        let bob_id = LocalIdentity::from_secret_bytes(*bob_key.secret_bytes());
        let limits = TransportLimits::default();
        let mut alice = UdpPeer::new(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            relay_addr,
            bind_a,
            Channel::initiator(&alice_id, pinned(created), session, limits).unwrap(),
            KnownPeers::new(),
        );
        let mut bob = UdpPeer::new(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            relay_addr,
            bind_b,
            Channel::responder(&bob_id, pinned(joined), session, limits).unwrap(),
            KnownPeers::new(),
        );
        alice.bind(Duration::from_secs(5)).unwrap();
        assert!(bob.bind(Duration::from_secs(5)).unwrap());
        std::thread::scope(|s| {
            let responder = s.spawn(|| bob.handshake(Duration::from_secs(10)));
            alice.handshake(Duration::from_secs(10)).unwrap();
            responder.join().unwrap().unwrap();
        });
        let session_hex = format!("{session:016x}");
        let peer = |peer, slot| Recovering {
            peer,
            renew_body: json!({ "session_id": session_hex, "slot": slot }),
            gateway,
            ended: Vec::new(),
        };
        (peer(alice, "A"), peer(bob, "B"))
    }

    /// Handles an error of the peer: when it says the binding is gone (KEEPALIVEs unanswered,
    /// or a relay CLOSE `IDLE`/`EXPIRED`), gets a fresh token for the slot from the gateway
    /// and binds again with it, keeping the channel. Any other error fails the test.
    fn recover(&mut self, error: UdpPeerError) {
        assert!(
            matches!(error, UdpPeerError::Lost | UdpPeerError::Unbound(_)),
            "{error}"
        );
        self.ended.push(format!("{error:?}"));
        let (status, grant) = (self.gateway)(self.renew_body.clone());
        assert_eq!(status, 200, "{grant}");
        let (token, secret) = credentials(&grant);
        self.peer
            .recover(token, &secret, Duration::from_secs(10))
            .unwrap();
    }

    /// Bob's side: answers every numbered message with its bytes reversed, recovering his
    /// binding whenever it is gone, until "bye". Returns the numbers he received, copies
    /// included.
    fn answer_until_bye(&mut self) -> Vec<u32> {
        let mut received = Vec::new();
        loop {
            let message = match self.peer.recv_message(Duration::from_secs(30)) {
                Ok(message) => message,
                Err(UdpPeerError::Timeout(what)) => panic!("Bob waited too long for {what}"),
                Err(e) => {
                    self.recover(e);
                    continue;
                }
            };
            if message == b"bye" {
                return received;
            }
            received.push(number(&message));
            let mut reply = message;
            reply.reverse();
            self.peer.send(&reply).unwrap();
        }
    }

    /// Alice's side: sends message `n` and waits a second for its answer, skipping late
    /// answers to earlier copies. Without an answer she sends it again: the retry is the
    /// application's, since the relay drops what arrives while a binding is gone and the
    /// channel does not retransmit application data. Returns how many times it was sent.
    fn ask(&mut self, n: u32) -> u32 {
        let message = format!("message {n} of a recovered session").into_bytes();
        let mut expected = message.clone();
        expected.reverse();
        for attempt in 1..=30 {
            self.peer.send(&message).unwrap();
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.peer.recv_message(left) {
                    Ok(answer) if answer == expected => return attempt,
                    Ok(answer) => {
                        let mut late = answer;
                        late.reverse();
                        assert!(number(&late) < n, "an answer to a later message");
                    }
                    Err(UdpPeerError::Timeout(_)) => break,
                    Err(e) => {
                        self.recover(e);
                        break;
                    }
                }
            }
        }
        panic!("message {n} was never answered");
    }
}

/// The number of a message of [`Recovering::ask`].
fn number(message: &[u8]) -> u32 {
    let text = std::str::from_utf8(message).unwrap();
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

/// The gateway's `POST /v1/sessions/renew` with the `app` key, callable from blocking code.
fn renew_route(
    setup: &Setup,
    gw: &Gateway,
) -> impl Fn(serde_json::Value) -> (u16, serde_json::Value) + Sync + use<> {
    let http = client(&setup.pki.ca_pem, None);
    let runtime = tokio::runtime::Handle::current();
    let renew_url = gw.url("/v1/sessions/renew");
    let app_key = setup.key("app").to_string();
    move |body: serde_json::Value| {
        let (status, _, answer) = runtime.block_on(post(&http, &renew_url, Some(&app_key), body));
        (status, answer)
    }
}

/// The relay's idle timeout in the recovery tests: keepalives every 2 s, so a peer finds a
/// silent relay within 2 × 2 s + 3 × `KEEPALIVE_RETRY` = 10 s of last hearing from it.
const RECOVERY_RELAY: &str = "[limits]\nidle_timeout_secs = 6\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_a_relay_restart_with_fresh_tokens_and_the_same_noise_session() {
    let setup = Setup::new("e2e-restart");
    let relay_config = relay_config(&setup, RECOVERY_RELAY);
    let relay = tokio::task::block_in_place(|| {
        RelayProcess::start(relay_binary(), &setup.relay_key, &relay_config).unwrap()
    });
    let config = setup
        .config(1, "")
        .replace("127.0.0.1:7000", &relay.listen.to_string());
    let gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);
    let rng = ring::rand::SystemRandom::new();
    let alice_key = PeerStaticKey::generate(&rng).unwrap();
    let bob_key = PeerStaticKey::generate(&rng).unwrap();
    let (created, joined) = create_and_join(&setup, &gw, &http, &alice_key, &bob_key).await;
    let gateway = renew_route(&setup, &gw);
    let relay_key = setup.relay_key.clone();

    /// Messages before the relay is killed, and after both peers are bound again.
    const BEFORE: u32 = 10;
    const AFTER: u32 = 20;
    let started = Instant::now();
    let relay = tokio::task::spawn_blocking(move || {
        let (mut alice, mut bob) =
            Recovering::pair(&created, &joined, &alice_key, &bob_key, &gateway);
        let mut relay = Some(relay);
        std::thread::scope(|s| {
            let responder = s.spawn(|| (bob.answer_until_bye(), bob.ended));
            let mut attempts = Vec::new();
            for n in 0..BEFORE {
                attempts.push(alice.ask(n));
                std::thread::sleep(Duration::from_millis(100));
            }
            // Mid-exchange the relay dies, forgetting everything; a new relay process starts on
            // the same address with the same config and key.
            let old = relay.take().unwrap();
            old.signal("KILL").unwrap();
            drop(old);
            relay = Some(RelayProcess::start(relay_binary(), &relay_key, &relay_config).unwrap());
            // Alice asks until answered: the new relay drops what she sends for a session it
            // does not hold, she finds the binding lost, recovers, and resends while Bob
            // recovers too.
            let recovering = alice.ask(BEFORE);
            assert!(
                recovering > 1,
                "the first copy went to a relay that forgot the session"
            );
            assert_eq!(alice.ended, ["Lost"]);
            // Both bound again: every message from now on arrives on its first sending.
            for n in BEFORE + 1..=BEFORE + AFTER {
                attempts.push(alice.ask(n));
                std::thread::sleep(Duration::from_millis(100));
            }
            alice.peer.send(b"bye").unwrap();
            let (received, bob_ended) = responder.join().unwrap();
            assert_eq!(bob_ended, ["Lost"]);
            assert!(
                attempts.iter().all(|&a| a == 1),
                "only the message in flight at the restart was resent: {attempts:?}"
            );
            for n in 0..=BEFORE + AFTER {
                assert!(received.contains(&n), "message {n} never reached Bob");
            }
            // The Noise session is the one of the first handshake: no handshake since (one
            // would start its counters again), and every frame Alice sealed, before the restart
            // and after, took the next counter of the same sending key.
            let sealed = u64::from(attempts.iter().sum::<u32>() + recovering + 1);
            let transport = alice.peer.channel().transport().unwrap();
            assert!(!alice.peer.channel().is_handshaking());
            assert_eq!(transport.send_epoch(), 0);
            assert!(
                transport.send_counter() >= sealed,
                "{}",
                transport.send_counter()
            );
            alice.peer.close().unwrap();
        });
        relay.unwrap()
    })
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );

    // The new relay bound both slots once each, after challenging the first BINDs (its cookie
    // secret is new).
    let page = tokio::task::block_in_place(|| relay.metrics());
    assert_eq!(metric(&page, "ferry_binds_accepted_total"), 2, "{page}");
    assert!(metric(&page, "ferry_challenges_total") >= 2, "{page}");
    let gw_page = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&gw_page, "ferry_gateway_sessions_renewed_total"), 2);
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_unbound_for_idleness_is_bound_again_with_a_fresh_token() {
    let setup = Setup::new("e2e-idle");
    let relay = tokio::task::block_in_place(|| start_relay(&setup, RECOVERY_RELAY));
    let config = setup
        .config(1, "")
        .replace("127.0.0.1:7000", &relay.listen.to_string());
    let gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);
    let rng = ring::rand::SystemRandom::new();
    let alice_key = PeerStaticKey::generate(&rng).unwrap();
    let bob_key = PeerStaticKey::generate(&rng).unwrap();
    let (created, joined) = create_and_join(&setup, &gw, &http, &alice_key, &bob_key).await;
    let gateway = renew_route(&setup, &gw);

    tokio::task::spawn_blocking(move || {
        let (mut alice, mut bob) =
            Recovering::pair(&created, &joined, &alice_key, &bob_key, &gateway);
        std::thread::scope(|s| {
            let responder = s.spawn(|| (bob.answer_until_bye(), bob.ended));
            assert_eq!(alice.ask(0), 1);
            // Alice leaves her peer alone (no KEEPALIVEs) past the idle timeout: the relay
            // unbinds her slot and tells her why; Bob, waiting in recv_message, stays bound.
            std::thread::sleep(Duration::from_secs(9));
            assert!(alice.ask(1) > 1, "the first copy went to an unbound slot");
            assert_eq!(
                alice.ended,
                [format!("{:?}", UdpPeerError::Unbound(CloseReason::Idle))]
            );
            for n in 2..12 {
                assert_eq!(alice.ask(n), 1, "message {n}");
            }
            alice.peer.send(b"bye").unwrap();
            let (received, bob_ended) = responder.join().unwrap();
            assert!(bob_ended.is_empty(), "{bob_ended:?}");
            for n in 0..12 {
                assert!(received.contains(&n), "message {n} never reached Bob");
            }
            alice.peer.close().unwrap();
        });
    })
    .await
    .unwrap();

    let page = tokio::task::block_in_place(|| relay.metrics());
    assert_eq!(
        metric(&page, "ferry_notices_total{kind=\"idle\"}"),
        1,
        "{page}"
    );
    // Two first binds and Alice's recovery; the relay announced Bob's first bind to Alice and
    // Alice's recovery to Bob.
    assert_eq!(metric(&page, "ferry_binds_accepted_total"), 3, "{page}");
    assert_eq!(
        metric(&page, "ferry_notices_total{kind=\"peer_present\"}"),
        2,
        "{page}"
    );
    assert!(gw.stop().success());
}

/// A relay the gateway does not list registers itself with heartbeats (`[heartbeat]`); the
/// gateway's probe checks that it holds the key it reported, and only then hands it out. Its
/// `/metrics` count the heartbeats, and the probes apart from binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_registers_itself_by_heartbeat_and_is_handed_out_once_probed() {
    let setup = Setup::new("heartbeat");
    let listed = format!(
        "[[relays]]\nid = {RELAY_ID}\naddress = \"127.0.0.1:7000\"\npublic_key = \"{}\"\n\n",
        setup.relay_key.public()
    );
    let config = setup.config(1, "").replace(&listed, "").replace(
        "[relay_health]\nprobe = false\n",
        "[relay_health]\nprobe = true\ninterval_secs = 1\ntimeout_ms = 500\n",
    );
    assert!(!config.contains("[[relays]]"), "{config}");
    let gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);

    let key_file = setup.file("relay-heartbeat.key");
    write_file(&key_file, setup.key("listed-relay"), 0o600);
    let ca_file = setup.file("gateway-ca.pem");
    write_file(&ca_file, &setup.pki.ca_pem, 0o644);
    let mut relay_cfg = relay_config(&setup, "");
    let address = relay_cfg.listen[0];
    relay_cfg.sections.push_str(&format!(
        "\n[heartbeat]\ngateway_url = \"{}\"\napi_key_file = \"{}\"\nca_file = \"{}\"\n\
         address = \"{address}\"\ninterval_secs = 1\n",
        gw.url(""),
        key_file.display(),
        ca_file.display()
    ));
    let relay = tokio::task::block_in_place(|| {
        RelayProcess::start(relay_binary(), &setup.relay_key, &relay_cfg).unwrap()
    });

    // Until the heartbeat has come and a probe has passed: 503; then this relay.
    let alice = PeerStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let created = loop {
        let (status, _, body) = post(
            &http,
            &gw.url("/v1/sessions"),
            Some(setup.key("app")),
            json!({ "peer_public_key": alice.public().to_string() }),
        )
        .await;
        if status == 201 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "the relay was never handed out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(created["relay"]["address"], address.to_string());
    let page = tokio::task::block_in_place(|| relay.metrics());
    assert!(
        metric(&page, "ferry_heartbeats_total{result=\"ok\"}") >= 1,
        "{page}"
    );
    assert!(metric(&page, "ferry_probes_total") >= 1, "{page}");
    assert_eq!(metric(&page, "ferry_binds_accepted_total"), 0, "{page}");
}
