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

    // A key moved in without its public half gets it back (the packages chown both).
    for public in ["gateway-1.key.pub", "relay.key.pub"] {
        std::fs::remove_file(dir.join(public)).unwrap();
    }
    let (ok, out, err) = gateway(&["init", "--dir", dir_arg]);
    assert!(
        ok && out.contains("its public key was missing"),
        "{out}{err}"
    );
    assert!(relay_init().contains("its public key was missing"));
    let again: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert!(before == again, "the public keys written again differ");

    // A name no certificate can hold is refused before anything is written; a name given for a
    // certificate that is kept is said to be ignored.
    let (ok, _, err) = gateway(&["init", "--dir", dir_arg, "--name", "bad name!"]);
    assert!(!ok && err.contains("not a DNS name"), "{err}");
    let (ok, out, err) = gateway(&["init", "--dir", dir_arg, "--name", "gw.example.net"]);
    assert!(ok && out.contains("--name not applied"), "{out}{err}");

    // Half a TLS pair is refused rather than silently replaced.
    std::fs::remove_file(dir.join("gateway-tls.crt")).unwrap();
    let (ok, _, err) = gateway(&["init", "--dir", dir_arg]);
    assert!(!ok && err.contains("only one of"), "{err}");
}

/// Runs the gateway with `args`; fails the test if it has not exited within 10 s.
fn gateway_within_10s(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after 10 s (blocked on a file?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.success(), stderr)
}

/// A FIFO or a directory where the TLS certificate, the TLS key or a signing key should be:
/// `check-config` and `run` fail at once, saying what the path is.
#[test]
fn a_fifo_or_a_directory_as_a_key_or_certificate_fails_at_once() {
    let setup = Setup::new("cli-fifo");
    let fifo = setup.file("fifo");
    let made = Command::new("mkfifo")
        .args(["-m", "600"])
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::create_dir(setup.file("dir")).unwrap();
    let good = setup.config(1, "");
    for (field, name) in [
        ("tls.cert", "tls.crt"),
        ("tls.key", "tls.key"),
        ("signing.keys[0].key_file", "gateway-1.key"),
    ] {
        for (special, what) in [
            ("fifo", "is a FIFO (named pipe), not a regular file"),
            ("dir", "is a directory, not a regular file"),
        ] {
            let path = setup.file(&format!("{special}-{name}.toml"));
            let text = good.replacen(&format!("\"{name}\""), &format!("\"{special}\""), 1);
            write_file(&path, &text, 0o600);
            let path = path.to_str().unwrap();
            for args in [&["check-config", path][..], &["--config", path, "run"][..]] {
                let (ok, stderr) = gateway_within_10s(args);
                assert!(!ok, "{args:?}");
                assert!(stderr.contains(field), "{args:?}: {stderr}");
                assert!(stderr.contains(what), "{args:?}: {stderr}");
                assert!(!stderr.contains("chmod"), "{args:?}: {stderr}");
            }
        }
    }
}

/// An expired certificate is legal (the gateway serves it) but `check-config` and the start
/// warn, naming its notAfter date.
#[test]
fn an_expired_certificate_is_warned_about_by_check_config_and_at_start() {
    let setup = Setup::new("cli-expired");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    let cert = params.self_signed(&key).unwrap();
    write_file(&setup.file("old.crt"), &cert.pem(), 0o644);
    write_file(&setup.file("old.key"), &key.serialize_pem(), 0o600);
    let config = setup
        .config(1, "")
        .replace("\"tls.crt\"", "\"old.crt\"")
        .replace("\"tls.key\"", "\"old.key\"");
    let path = setup.file("expired.toml");
    write_file(&path, &config, 0o600);
    let warning = format!(
        "tls.cert: {}: the certificate expired on 2020-01-02 00:00:00 UTC (notAfter)",
        setup.file("old.crt").display()
    );
    let (ok, _, stderr) = gateway(&["check-config", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains(&format!("warning: {warning}")), "{stderr}");
    let gw = setup.start("expired", &config);
    let log = gw.log_text();
    assert!(log.contains("WARN") && log.contains(&warning), "{log}");
}
