//! End to end: a real `ferry-relay` process on 127.0.0.1 (XDP guard off: loopback) trusting
//! the gateway's signing key, a real `ferry-gateway` over HTTPS listing and probing it, and two
//! peers that get their tokens from the gateway — one creates the session, the other joins with
//! the join code — bind on the relay with them, run the Noise handshake through it and exchange
//! messages.
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
use std::time::Duration;

use base64::Engine as _;
use common::*;
use ferry_core::keys::{PeerPublicKey, PeerStaticKey};
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::proof::SlotSecret;
use ferry_core::token::TOKEN_LEN;
use ferry_core::wire::Slot;
use ferry_peer::bind::BindClient;
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
/// trusting the gateway's first signing key.
fn start_relay(setup: &Setup) -> RelayProcess {
    let (kid, signing) = &setup.signing[0];
    let config = RelayConfig {
        sections: "[xdp]\nmode = \"off\"\n\n[log]\nlevel = \"info\"\n".into(),
        log_filter: "info".into(),
        ..RelayConfig::loopback(vec![(*kid, signing.public())]).unwrap()
    };
    RelayProcess::start(relay_binary(), &setup.relay_key, &config).unwrap()
}

/// What a peer needs from a grant (`create` or `join` answer) to bind.
fn bind_client(grant: &serde_json::Value, slot: Slot) -> (u64, SocketAddr, BindClient) {
    let session = u64::from_str_radix(grant["session_id"].as_str().unwrap(), 16).unwrap();
    let token: [u8; TOKEN_LEN] = base64::engine::general_purpose::STANDARD
        .decode(grant["token"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let secret = SlotSecret::from_base64(grant["slot_secret"].as_str().unwrap()).unwrap();
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
    let relay = tokio::task::block_in_place(|| start_relay(&setup));
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
    let gw_page = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&gw_page, "ferry_gateway_tokens_minted_total"), 2);
    assert_eq!(metric(&gw_page, "ferry_gateway_sessions_joined_total"), 1);
    assert_eq!(
        metric(&gw_page, "ferry_gateway_relays{health=\"healthy\"}"),
        1
    );
    assert!(gw.stop().success());
}
