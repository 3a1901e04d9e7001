//! `ferry-peer create`, `join` and `renew` against a real `ferry-gateway` process over HTTPS.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use ferry_core::keys::{PeerPublicKey, PeerStaticKey, RelayStaticKey};
use ferry_core::wire::Slot;
use ferry_peer::gateway::{ApiKey, GatewayClient, GatewayError, Grant};
use ferry_testkit::gateway::{
    GatewayProcess, unrelated_ca_pem, workspace_binary, workspace_example,
};
use ferry_testkit::relay::{RelayConfig, RelayProcess};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-peer");

fn gateway_binary() -> &'static Path {
    static GATEWAY: OnceLock<PathBuf> = OnceLock::new();
    GATEWAY.get_or_init(|| workspace_binary("ferry-gateway", "ferry-gateway").unwrap())
}

/// A gateway with an `app` key allowed to create and join in every realm, listing a relay on
/// a loopback port nobody serves (these tests never bind).
fn gateway() -> GatewayProcess {
    gateway_named(&["localhost", "127.0.0.1"])
}

/// [`gateway`] with a certificate for `cert_names` only.
fn gateway_named(cert_names: &[&str]) -> GatewayProcess {
    let relay_key = RelayStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let port = ferry_testkit::free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    GatewayProcess::start_with_names(
        gateway_binary(),
        cert_names,
        &[("app", &["create:*", "join:*"])],
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        &relay_key,
        "",
    )
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `ferry-peer` with `args`, the API key (if any) in `FERRY_API_KEY` and nothing else of
/// the caller's environment that could hold one.
fn peer(args: &[&str], env_key: Option<&str>) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("FERRY_API_KEY");
    if let Some(key) = env_key {
        command.env("FERRY_API_KEY", key);
    }
    command.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The value of the `name value` line `name` of the CLI's output.
fn field<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {stdout:?}"))
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, PeerPublicKey) {
    let key = dir.join(format!("{name}.key"));
    ok(&peer(&["keygen", "--out", s(&key)], None));
    let public = ok(&peer(&["pubkey", s(&key)], None));
    (key, public.trim().parse().unwrap())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn grant(path: &Path) -> Grant {
    Grant::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn create_join_and_renew_write_grants_that_pin_each_other() {
    let gw = gateway();
    let dir = ferry_testkit::temp_dir("peer-gw-flow").unwrap();
    let (alice_key, alice_pub) = keygen(dir.path(), "alice");
    let (bob_key, bob_pub) = keygen(dir.path(), "bob");
    let api_key = gw.api_key("app").unwrap().to_string();
    let key_file = dir.path().join("api.key");
    ferry_testkit::write_private(&key_file, &format!("{api_key}\n")).unwrap();
    let ca = gw.ca_file();
    let url = gw.url();
    let common = ["--gateway", &url, "--ca", s(&ca)];

    // Alice creates, naming Bob; the key comes from the environment.
    let alice_grant = dir.path().join("alice.grant");
    // Bob's key as its public key file's line (the file also has a comment line).
    let bob_file = std::fs::read_to_string(dir.path().join("bob.key.pub")).unwrap();
    let bob_line = bob_file
        .lines()
        .find(|l| l.starts_with("ferry-public-v1 "))
        .unwrap();
    let mut args = vec!["create"];
    args.extend(common);
    args.extend([
        "--identity",
        s(&alice_key),
        "--expect-peer",
        bob_line.trim(),
        "--out",
        s(&alice_grant),
    ]);
    let created = ok(&peer(&args, Some(&api_key)));
    assert_eq!(mode(&alice_grant), 0o600);
    let a = grant(&alice_grant);
    assert_eq!(a.slot, Slot::A);
    assert_eq!(field(&created, "session_id"), a.session_id_hex());
    assert_eq!(field(&created, "slot"), "A");
    let code = field(&created, "join_code");
    assert_eq!(a.join_code.as_deref(), Some(code));
    assert_eq!(a.expected_peer_public_key, Some(bob_pub));
    assert!(!created.contains(&api_key));
    // A second create to the same --out keeps the first session's grant, unless --force.
    let again = peer(&args, Some(&api_key));
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        grant(&alice_grant).session_id,
        a.session_id,
        "the grant is kept"
    );

    // Bob joins with the code; the key comes from a file. He learns Alice's key.
    let bob_grant = dir.path().join("bob.grant");
    let mut args = vec!["join"];
    args.extend(common);
    args.extend([
        "--api-key-file",
        s(&key_file),
        "--identity",
        s(&bob_key),
        "--code",
        code,
        "--out",
        s(&bob_grant),
    ]);
    let joined = ok(&peer(&args, None));
    assert_eq!(mode(&bob_grant), 0o600);
    let b = grant(&bob_grant);
    assert_eq!(b.slot, Slot::B);
    assert_eq!(b.session_id, a.session_id);
    assert_eq!(b.relay, a.relay);
    assert_eq!(b.join_code, None);
    assert_eq!(b.expected_peer_public_key, Some(alice_pub));
    assert_eq!(field(&joined, "peer"), alice_pub.to_string());
    assert_eq!(field(&joined, "session_id"), a.session_id_hex());

    // The code worked once.
    let again = peer(&args, None);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("404 invalid_join_code"),
        "{}",
        text(&again.stderr)
    );

    // Alice renews into another file: same session and slot, a fresh token and secret.
    let renewed_file = dir.path().join("alice-renewed.grant");
    let mut args = vec!["renew"];
    args.extend(common);
    args.extend(["--grant", s(&alice_grant), "--out", s(&renewed_file)]);
    let renewed = ok(&peer(&args, Some(&api_key)));
    assert_eq!(mode(&renewed_file), 0o600);
    let r = grant(&renewed_file);
    assert_eq!((r.session_id, r.slot), (a.session_id, Slot::A));
    assert_ne!(*r.token, *a.token);
    assert_ne!(r.slot_secret.expose(), a.slot_secret.expose());
    assert!(r.expires_at >= a.expires_at);
    assert_eq!(r.expected_peer_public_key, Some(bob_pub));
    assert_eq!(r.join_code, None);
    assert_eq!(field(&renewed, "session_id"), a.session_id_hex());
    assert_eq!(field(&renewed, "expires_at"), r.expires_at.to_string());

    // Bob renews in place.
    let mut args = vec!["renew"];
    args.extend(common);
    args.extend(["--api-key-file", s(&key_file), "--grant", s(&bob_grant)]);
    ok(&peer(&args, None));
    assert_eq!(mode(&bob_grant), 0o600);
    let b2 = grant(&bob_grant);
    assert_eq!((b2.session_id, b2.slot), (a.session_id, Slot::B));
    assert_ne!(*b2.token, *b.token);
    assert_eq!(b2.expected_peer_public_key, Some(alice_pub));

    // The gateway's log never holds the API key, and the CLI never printed a secret.
    assert!(!gw.log_text().contains(&api_key));
}

#[test]
fn a_gateway_certificate_from_another_ca_is_refused() {
    let gw = gateway();
    let dir = ferry_testkit::temp_dir("peer-gw-ca").unwrap();
    let (alice_key, _) = keygen(dir.path(), "alice");
    let other_ca = dir.path().join("other-ca.crt");
    std::fs::write(&other_ca, unrelated_ca_pem().unwrap()).unwrap();
    let out_file = dir.path().join("alice.grant");
    let url = gw.url();
    let out = peer(
        &[
            "create",
            "--gateway",
            &url,
            "--ca",
            s(&other_ca),
            "--identity",
            s(&alice_key),
            "--out",
            s(&out_file),
        ],
        Some(gw.api_key("app").unwrap()),
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot reach the gateway"), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(!out_file.exists());
}

#[test]
fn a_gateway_certificate_for_another_name_is_refused() {
    // The certificate names localhost only; the client asks for 127.0.0.1.
    let gw = gateway_named(&["localhost"]);
    let dir = ferry_testkit::temp_dir("peer-gw-name").unwrap();
    let (alice_key, _) = keygen(dir.path(), "alice");
    let out_file = dir.path().join("alice.grant");
    let by_address = format!("https://127.0.0.1:{}", gw.public.port());
    let ca = gw.ca_file();
    let mut args = vec![
        "create",
        "--gateway",
        &by_address,
        "--ca",
        s(&ca),
        "--identity",
        s(&alice_key),
        "--out",
        s(&out_file),
    ];
    let out = peer(&args, Some(gw.api_key("app").unwrap()));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot reach the gateway"), "{stderr}");
    assert!(
        stderr.contains("certificate not valid for name \"127.0.0.1\""),
        "{stderr}"
    );
    assert!(!out_file.exists());

    // By the name it has, the same gateway and CA work.
    let by_name = gw.url();
    args[2] = &by_name;
    ok(&peer(&args, Some(gw.api_key("app").unwrap())));
    assert_eq!(mode(&out_file), 0o600);
}

#[test]
fn a_missing_or_wrong_api_key_is_a_clear_error_that_does_not_show_the_key() {
    let gw = gateway();
    let dir = ferry_testkit::temp_dir("peer-gw-key").unwrap();
    let (alice_key, _) = keygen(dir.path(), "alice");
    let out_file = dir.path().join("alice.grant");
    let url = gw.url();
    let ca = gw.ca_file();
    let args = [
        "create",
        "--gateway",
        &url,
        "--ca",
        s(&ca),
        "--identity",
        s(&alice_key),
        "--out",
        s(&out_file),
    ];
    let out = peer(&args, None);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no API key: give --api-key-file FILE or set the FERRY_API_KEY"),
        "{stderr}"
    );

    let wrong = "fgk1.app.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let out = peer(&args, Some(wrong));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("401 unauthorized"), "{stderr}");
    assert!(!stderr.contains("AAAAAAAAAAAA"), "{stderr}");
    assert!(!out_file.exists());

    // The key is not an option: clap refuses one.
    let mut with_flag = args.to_vec();
    with_flag.extend(["--api-key", wrong]);
    let out = peer(&with_flag, None);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unexpected argument"));
}

#[test]
fn the_exchange_example_binds_both_grants_on_a_real_relay_and_talks() {
    let relay_bin = workspace_binary("ferry-relay", "ferry-relay").unwrap();
    let example = workspace_example("ferry-peer", "exchange").unwrap();
    let relay_key = RelayStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let mut relay_config = RelayConfig::loopback(Vec::new()).unwrap();
    let gw = GatewayProcess::start(
        gateway_binary(),
        &[("app", &["create:*", "join:*"])],
        relay_config.listen[0],
        &relay_key,
        "",
    )
    .unwrap();
    relay_config.gateway_keys = vec![gw.gateway_key().unwrap()];
    let _relay = RelayProcess::start(&relay_bin, &relay_key, &relay_config).unwrap();

    let dir = ferry_testkit::temp_dir("peer-gw-exchange").unwrap();
    let (alice_key, _) = keygen(dir.path(), "alice");
    let (bob_key, bob_pub) = keygen(dir.path(), "bob");
    let api_key = gw.api_key("app").unwrap().to_string();
    let (url, ca) = (gw.url(), gw.ca_file());
    let (a_grant, b_grant) = (dir.path().join("a.grant"), dir.path().join("b.grant"));
    let bob_text = bob_pub.to_string();
    let created = ok(&peer(
        &[
            "create",
            "--gateway",
            &url,
            "--ca",
            s(&ca),
            "--identity",
            s(&alice_key),
            "--expect-peer",
            &bob_text,
            "--out",
            s(&a_grant),
        ],
        Some(&api_key),
    ));
    let code = field(&created, "join_code");
    ok(&peer(
        &[
            "join",
            "--gateway",
            &url,
            "--ca",
            s(&ca),
            "--identity",
            s(&bob_key),
            "--code",
            code,
            "--out",
            s(&b_grant),
        ],
        Some(&api_key),
    ));

    let out = Command::new(&example)
        .args([s(&a_grant), s(&alice_key), s(&b_grant), s(&bob_key)])
        .arg(relay_config.listen[0].to_string())
        .arg("a marker 7f3c")
        .output()
        .unwrap();
    let stdout = ok(&out);
    assert!(stdout.contains("B got: a marker 7f3c"), "{stdout}");
    assert!(stdout.contains("A got back: a marker 7f3c"), "{stdout}");

    // Slot B driven with Alice's key: Alice's grant pins Bob's key, so the handshake fails.
    let b2 = dir.path().join("b2.grant");
    let created = ok(&peer(
        &[
            "create",
            "--gateway",
            &url,
            "--ca",
            s(&ca),
            "--identity",
            s(&alice_key),
            "--expect-peer",
            &bob_text,
            "--out",
            s(&a_grant),
            // A new session's grant over the old one's.
            "--force",
        ],
        Some(&api_key),
    ));
    ok(&peer(
        &[
            "join",
            "--gateway",
            &url,
            "--ca",
            s(&ca),
            "--identity",
            s(&bob_key),
            "--code",
            field(&created, "join_code"),
            "--out",
            s(&b2),
        ],
        Some(&api_key),
    ));
    let out = Command::new(&example)
        .args([s(&a_grant), s(&alice_key), s(&b2), s(&alice_key)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("A's handshake"), "{stderr}");
    assert!(stderr.contains("wrong identity"), "{stderr}");
}

#[tokio::test]
async fn the_library_maps_the_gateways_refusals_to_typed_errors_with_retry_after() {
    let relay_key = RelayStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let port = ferry_testkit::free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let gw = GatewayProcess::start(
        gateway_binary(),
        &[("app", &["create:*", "join:*"]), ("acme", &["create:acme"])],
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        &relay_key,
        "[limits]\nper_key_rate = 0.1\nper_key_burst = 3\n",
    )
    .unwrap();
    let key = |id: &str| ApiKey::new(gw.api_key(id).unwrap());
    let app = GatewayClient::new(&gw.url(), &gw.ca_file(), &key("app")).unwrap();
    let acme = GatewayClient::new(&gw.url(), &gw.ca_file(), &key("acme")).unwrap();
    let debug = format!("{app:?}");
    assert!(!debug.contains(gw.api_key("app").unwrap()), "{debug}");
    let rng = ring::rand::SystemRandom::new();
    let alice = PeerStaticKey::generate(&rng).unwrap().public();
    let bob = PeerStaticKey::generate(&rng).unwrap().public();
    let carol = PeerStaticKey::generate(&rng).unwrap().public();

    // Bob is expected; Carol's join is refused and the code stays usable.
    let created = app.create("default", &alice, Some(&bob)).await.unwrap();
    let code = created.join_code.clone().unwrap();
    let refused = |e: GatewayError| match e {
        GatewayError::Refused {
            status,
            code,
            retry_after,
        } => (status, code, retry_after),
        other => panic!("not a refusal: {other}"),
    };
    let err = app.join(&code, &carol).await.unwrap_err();
    assert_eq!(refused(err), (403, "peer_identity_mismatch".into(), None));
    let joined = app.join(&code, &bob).await.unwrap();
    assert_eq!(joined.expected_peer_public_key, Some(alice));

    // The acme key may not create outside its realm, nor renew a slot it did not take.
    let err = acme.create("default", &alice, None).await.unwrap_err();
    assert_eq!(refused(err), (403, "forbidden".into(), None));
    let err = acme.renew(created.session_id, Slot::A).await.unwrap_err();
    assert_eq!(refused(err), (404, "not_found".into(), None));
    // Its burst of three is spent: the fourth request is rate limited, with Retry-After.
    acme.create("acme", &alice, None).await.unwrap();
    let err = acme.create("acme", &alice, None).await.unwrap_err();
    let (status, code, retry_after) = refused(err);
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
}
