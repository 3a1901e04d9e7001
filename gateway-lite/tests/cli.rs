//! The CLI: `check-config` lists every problem and fails, `apikey new` prints a key once with
//! the table to paste, and refuses bad scopes.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn gateway(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_config_accepts_a_good_file_and_lists_every_problem_of_a_bad_one() {
    let setup = Setup::new("cli");
    let good = setup.file("good.toml");
    write_file(&good, &setup.config(1, ""), 0o600);
    let (ok, stdout, stderr) = gateway(&["check-config", good.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(": ok (HTTPS on 127.0.0.1:0, signing kid 1, 2 published key(s)"),
        "{stdout}"
    );
    for (kid, key) in &setup.signing {
        assert!(
            stdout.contains(&format!("kid {kid}")) && stdout.contains(&key.public().to_string()),
            "{stdout}"
        );
    }
    let bad = setup.file("bad.toml");
    let text = setup.config(
        3,
        "[sessions]\ntoken_lifetime_secs = 5\n\n[limits]\nper_ip_rate = -1.0\n",
    );
    write_file(&bad, &text, 0o600);
    let (ok, _, stderr) = gateway(&["check-config", bad.to_str().unwrap()]);
    assert!(!ok);
    for field in [
        "signing.active_kid",
        "sessions.token_lifetime_secs",
        "limits.per_ip_rate",
    ] {
        assert!(stderr.contains(field), "{field} missing: {stderr}");
    }
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    let (ok, _, stderr) = gateway(&["check-config", setup.file("none.toml").to_str().unwrap()]);
    assert!(!ok && stderr.contains("none.toml"), "{stderr}");
}

#[test]
fn apikey_new_prints_the_key_once_and_refuses_bad_input() {
    let (ok, stdout, _) = gateway(&[
        "apikey",
        "new",
        "--id",
        "svc",
        "--scope",
        "create:acme",
        "--scope",
        "join:*",
    ]);
    assert!(ok);
    let key = stdout.lines().nth(1).unwrap().trim();
    assert!(key.starts_with("fgk1.svc."));
    assert_eq!(stdout.matches(key).count(), 1);
    assert!(
        stdout.contains("scopes = [\"create:acme\", \"join:*\"]"),
        "{stdout}"
    );
    let (ok, _, stderr) = gateway(&["apikey", "new", "--scope", "admin:everything"]);
    assert!(!ok && stderr.contains("admin:everything"), "{stderr}");
    let (ok, _, stderr) = gateway(&["apikey", "new", "--id", "Bad Id", "--scope", "join:x"]);
    assert!(!ok && stderr.contains("key id"), "{stderr}");
    let (ok, _, _) = gateway(&["apikey", "new"]);
    assert!(!ok, "a key without scope is refused");
}

/// What the Debian packages' post-install step does, into a scratch directory instead of
/// /var/lib/ferry: `ferry-gateway init` and `ferry-relay init` make the keys and the
/// certificate, after which the shipped example configs pass `check-config` unedited, and a
/// second run keeps every file.
#[test]
fn init_makes_the_shipped_configs_pass_check_config() {
    use std::os::unix::fs::PermissionsExt as _;

    let scratch = ferry_testkit::temp_dir("gateway-init").unwrap();
    let dir = scratch.path().join("state");
    let dir_arg = dir.to_str().unwrap();
    let relay = ferry_testkit::gateway::workspace_binary("ferry-relay", "ferry-relay").unwrap();
    let relay_init = || {
        let out = Command::new(&relay)
            .args(["init", "--dir", dir_arg])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let (ok, out, err) = gateway(&["init", "--dir", dir_arg, "--name", "gw.example.net"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("gw.example.net"), "{out}");
    relay_init();

    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    for secret in ["gateway-1.key", "gateway-tls.key", "relay.key"] {
        assert_eq!(mode(secret), 0o600, "{secret}");
    }
    let files = [
        "gateway-1.key",
        "gateway-1.key.pub",
        "gateway-tls.crt",
        "gateway-tls.key",
        "relay.key",
        "relay.key.pub",
    ];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();

    let shipped = |text: &str, name: &str| {
        let path = scratch.path().join(name);
        std::fs::write(&path, text.replace("/var/lib/ferry", dir_arg)).unwrap();
        path
    };
    let gateway_toml = shipped(include_str!("../gateway.example.toml"), "gateway.toml");
    let relay_toml = shipped(include_str!("../../relay/relay.example.toml"), "relay.toml");
    let (ok, out, err) = gateway(&["check-config", gateway_toml.to_str().unwrap()]);
    assert!(ok, "the shipped gateway config: {out}{err}");
    let out = Command::new(&relay)
        .arg("check-config")
        .arg(&relay_toml)
        .output()
        .unwrap();
    assert!(out.status.success(), "the shipped relay config: {out:?}");

    // Again: everything kept, nothing overwritten.
    let (ok, out, err) = gateway(&["init", "--dir", dir_arg]);
    assert!(ok && out.contains("kept"), "{out}{err}");
    assert!(relay_init().contains("kept"));
    let after: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert!(before == after, "a second init changed a file");

    // Half a TLS pair is refused rather than silently replaced.
    std::fs::remove_file(dir.join("gateway-tls.crt")).unwrap();
    let (ok, _, err) = gateway(&["init", "--dir", dir_arg]);
    assert!(!ok && err.contains("only one of"), "{err}");
}
