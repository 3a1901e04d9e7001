//! End to end: a real `ferry-relay` process on 127.0.0.1 (XDP guard off: loopback) trusting
//! the gateway's signing key, a real `ferry-gateway` over HTTPS listing and probing it, and two
//! peers that get their tokens from the gateway — one creates the session, the other joins with
//! the join code — bind on the relay with them, run the Noise handshake through it and exchange
//! messages; and a session that outlives its tokens because both peers renew their slots
//! through the gateway, next to one that does not and is closed at its token's expiry.
//!
//! Where the relay binary comes from: Cargo tells a test the path of its own package's binaries
//! only (`CARGO_BIN_EXE_*`), and artifact dependencies are not stable. So [`relay_binary`] runs
//! the same `cargo` that built this test (`env!("CARGO")`) to build `ferry-relay` with the same
//! profile into the same target directory, and uses the result. Under `cargo test --workspace`
//! that is a no-op check (the relay's own tests built it); under `cargo test -p ferry-gateway`
//! it builds it once; and it can never pick up a stale binary left over from an older build.
//! Cargo does not hold the target directory's lock while tests run, so the nested build
//! does not wait for the outer one.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
use ferry_peer::udp::UdpPeer;
use ferry_testkit::metrics::metric;
use ferry_testkit::micros_now;
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use serde_json::json;

/// Builds (if needed) and returns the `ferry-relay` binary of this build's profile and target
/// directory; see the module doc.
fn relay_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // This test runs from <target>/<profile>/deps/e2e-<hash>.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target_dir = profile_dir.parent().unwrap();
        let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => "dev",
            other => other,
        }
        .to_string();
        let mut cargo = Command::new(env!("CARGO"));
        // Cargo sets these for the test process; a build script that watches one of them
        // (ring's watches CARGO_MANIFEST_DIR) would otherwise see a change and rebuild.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let set_for_tests = name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref());
            if set_for_tests {
                cargo.env_remove(name.as_ref());
            }
        }
        let out = cargo
            .args([
                "build",
                "--locked",
                "--package",
                "ferry-relay",
                "--bin",
                "ferry-relay",
            ])
            .args(["--profile", &profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building ferry-relay for the end-to-end test failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join("ferry-relay");
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
}

/// A `ferry-relay` on 127.0.0.1 (its XDP guard off: loopback) with the setup's relay key,
/// trusting the gateway's first signing key; `extra` adds config sections.
fn start_relay(setup: &Setup, extra: &str) -> RelayProcess {
    let (kid, signing) = &setup.signing[0];
    let config = RelayConfig {
        sections: format!("[xdp]\nmode = \"off\"\n\n[log]\nlevel = \"info\"\n\n{extra}"),
        log_filter: "info".into(),
        ..RelayConfig::loopback(vec![(*kid, signing.public())]).unwrap()
    };
    RelayProcess::start(relay_binary(), &setup.relay_key, &config).unwrap()
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
