//! The peer CLI end to end: key generation, refusing readable key files, known peers.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-peer");

/// A scratch directory, removed on drop.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ferry-peer-cli-{name}-"))
        .tempdir()
        .unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("ferry-peer runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn keygen_writes_a_private_key_and_pubkey_reads_it_back() {
    let dir = scratch("keygen");
    let key = dir.path().join("peer.key");
    let out = run(&["keygen", "--out", path_str(&key)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let public = std::fs::read_to_string(dir.path().join("peer.key.pub")).unwrap();
    let out = run(&["pubkey", path_str(&key)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        public.contains(printed.trim()),
        "{public:?} should contain {printed:?}"
    );
    // The secret never reaches the terminal.
    let secret_line = std::fs::read_to_string(&key).unwrap();
    let secret_b64 = secret_line
        .lines()
        .find(|l| l.starts_with("ferry-secret-v1"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .to_owned();
    let keygen_again = run(&["keygen", "--out", path_str(&key)]);
    assert!(
        !keygen_again.status.success(),
        "an existing key is never overwritten by default"
    );
    for out in [&out, &keygen_again] {
        assert!(!text(&out.stdout).contains(&secret_b64));
        assert!(!text(&out.stderr).contains(&secret_b64));
    }
}

#[test]
fn a_key_file_readable_by_others_is_refused_with_the_fix() {
    let dir = scratch("perms");
    let key = dir.path().join("peer.key");
    assert!(run(&["keygen", "--out", path_str(&key)]).status.success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["pubkey", path_str(&key)]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(err.contains(path_str(&key)), "{err}");
}

#[test]
fn known_peers_can_be_listed_and_forgotten() {
    let dir = scratch("known");
    let file = dir.path().join("known-peers");
    let key = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    std::fs::write(
        &file,
        format!("# trusted on first use\nbob {key}\ncarol {key}\n"),
    )
    .unwrap();
    let list = run(&["known-peers", "--file", path_str(&file), "list"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let listed = text(&list.stdout);
    assert!(
        listed.contains("bob") && listed.contains("carol"),
        "{listed}"
    );
    let forget = run(&["known-peers", "--file", path_str(&file), "forget", "bob"]);
    assert!(forget.status.success(), "{}", text(&forget.stderr));
    let listed = text(&run(&["known-peers", "--file", path_str(&file), "list"]).stdout);
    assert!(
        !listed.contains("bob") && listed.contains("carol"),
        "{listed}"
    );
    let again = run(&["known-peers", "--file", path_str(&file), "forget", "bob"]);
    assert!(
        !again.status.success(),
        "forgetting an unknown peer is an error"
    );
    std::fs::write(&file, "bob not-base64\n").unwrap();
    let bad = run(&["known-peers", "--file", path_str(&file), "list"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("line 1"),
        "{}",
        text(&bad.stderr)
    );
}

/// A grant file the CLI can read (its token is not one a relay would take) and a key file.
fn grant_and_key(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use base64::Engine as _;
    let b64 =
        |len: usize, byte: u8| base64::engine::general_purpose::STANDARD.encode(vec![byte; len]);
    let grant = serde_json::json!({
        "session_id": "2146d4dc68d435dd", "slot": "A",
        "token": b64(208, 7), "slot_secret": b64(32, 9),
        "kid": 1, "not_before": 1795598326u64, "expires_at": 1795598626u64,
        "relay": {"id": 5, "address": "127.0.0.1:9", "public_key": b64(32, 3)},
        "expected_peer_public_key": b64(32, 4),
    });
    let grant_file = dir.join("a.grant");
    std::fs::write(&grant_file, grant.to_string()).unwrap();
    let key = dir.join("peer.key");
    assert!(run(&["keygen", "--out", path_str(&key)]).status.success());
    (grant_file, key)
}

/// Runs `ferry-peer` without FERRY_API_KEY in its environment.
fn run_without_key(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("FERRY_API_KEY")
        .output()
        .expect("ferry-peer runs")
}

#[test]
fn tunnel_help_names_the_session_options_and_the_key_rules() {
    let out = run(&["tunnel", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    for needle in [
        "--grant <FILE>",
        "--identity <FILE>",
        "--gateway <URL>",
        "--ca <FILE>",
        "--api-key-file <FILE>",
        "--relay <ADDR>",
        "--connect-timeout <SECS>",
        "--listen <ADDR>",
        "--connect <ADDR>",
        "FERRY_API_KEY",
        "never on the command\nline",
        "ends when the grant's token expires",
        "Exit status: 0 on success, 1 on failure",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}

#[test]
fn session_commands_fail_with_one_clear_line_on_bad_input() {
    let dir = scratch("session-errors");
    let (grant, key) = grant_and_key(dir.path());
    let missing = dir.path().join("nope.grant");

    // No grant file.
    let out = run_without_key(&[
        "tunnel",
        "--grant",
        path_str(&missing),
        "--identity",
        path_str(&key),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("reading the grant") && err.contains("nope.grant"),
        "{err}"
    );

    // A key file that cannot be read.
    let out = run_without_key(&[
        "tunnel",
        "--grant",
        path_str(&grant),
        "--identity",
        path_str(&dir.path().join("no.key")),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("reading the identity") && err.contains("no.key"),
        "{err}"
    );

    // Gateway arguments but no API key, neither by file nor in the environment.
    let out = run_without_key(&[
        "tunnel",
        "--grant",
        path_str(&grant),
        "--identity",
        path_str(&key),
        "--gateway",
        "https://localhost:1",
        "--ca",
        path_str(&grant),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no API key: give --api-key-file FILE or set the FERRY_API_KEY"),
        "{err}"
    );

    // --ca without --gateway, and neither --listen nor --connect: usage errors.
    let out = run_without_key(&[
        "tunnel",
        "--grant",
        path_str(&grant),
        "--identity",
        path_str(&key),
        "--ca",
        path_str(&grant),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--gateway"),
        "{}",
        text(&out.stderr)
    );
    let out = run_without_key(&[
        "tunnel",
        "--grant",
        path_str(&grant),
        "--identity",
        path_str(&key),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--listen"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn without_a_gateway_the_session_says_it_cannot_renew_and_times_out_clearly() {
    let dir = scratch("session-nogw");
    let (grant, key) = grant_and_key(dir.path());
    // Nothing answers at the grant's relay address: the connect times out after a second.
    let out = run_without_key(&[
        "tunnel",
        "--grant",
        path_str(&grant),
        "--identity",
        path_str(&key),
        "--connect-timeout",
        "1",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no --gateway: the session cannot renew its token"),
        "{err}"
    );
    assert!(
        err.contains("connecting the session: timed out after 1s waiting for the relay's BIND-ACK"),
        "{err}"
    );
}
