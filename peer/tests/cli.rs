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
