//! `ferry-relay` as an operator runs it: what a config names on the host (XDP interfaces) is
//! checked there, a key file's problem is told once, and a second relay on a port in use does
//! not start.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use ferry_testkit::fixtures::Authority;
use ferry_testkit::gateway::workspace_binary;
use ferry_testkit::relay::{RelayConfig, RelayProcess};

/// Writes a relay config with `xdp` as its `[xdp]` section and a fresh relay key beside it
/// into `dir`; returns the config's path.
fn config(dir: &Path, xdp: &str) -> std::path::PathBuf {
    let relay = workspace_binary("ferry-relay", "ferry-relay").unwrap();
    let key = dir.join("relay.key");
    if !key.exists() {
        let out = Command::new(&relay)
            .args(["keygen", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let auth = Authority::new().unwrap();
    let mut cfg = RelayConfig::loopback(vec![auth.gateway_key()]).unwrap();
    cfg.sections = xdp.to_owned();
    let path = dir.join("relay.toml");
    std::fs::write(&path, cfg.text()).unwrap();
    path
}

fn check(path: &Path) -> Output {
    let relay = workspace_binary("ferry-relay", "ferry-relay").unwrap();
    Command::new(relay)
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_config_refuses_an_xdp_interface_this_host_does_not_have() {
    let dir = ferry_testkit::temp_dir("relay-cli").unwrap();
    let path = config(
        dir.path(),
        "[xdp]\nmode = \"native\"\ninterfaces = [\"lo\", \"nosuch0\"]\n",
    );
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("xdp.interfaces[1]: there is no network interface named nosuch0"),
        "{stderr}"
    );
    assert!(!stderr.contains("interfaces[0]"), "lo exists: {stderr}");
    // With the guard off, the interfaces are not looked at.
    let path = config(dir.path(), "[xdp]\nmode = \"off\"\n");
    let out = check(&path);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn check_config_takes_the_file_as_an_argument_or_as_config_but_not_two() {
    let dir = ferry_testkit::temp_dir("relay-cli").unwrap();
    let good = config(dir.path(), "[xdp]\nmode = \"off\"\n");
    let relay = workspace_binary("ferry-relay", "ferry-relay").unwrap();
    let run = |args: &[&str]| Command::new(&relay).args(args).output().unwrap();
    let good = good.to_str().unwrap();
    for args in [
        ["check-config", good].as_slice(),
        &["check-config", "--config", good],
        &["--config", good, "check-config"],
        &["--config", good, "check-config", good],
    ] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    // A CPU the host does not have is a fact of the host, checked here as interfaces are.
    let text = std::fs::read_to_string(good).unwrap();
    let cpus = text.replace("[relay]\n", "[relay]\ncpus = [1000]\n");
    assert_ne!(cpus, text);
    let many = dir.path().join("cpus.toml");
    std::fs::write(&many, cpus).unwrap();
    let out = run(&["check-config", many.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("relay.cpus[0]: this host has no CPU 1000"),
        "{stderr}"
    );
    let out = run(&["--config", "/nonexistent/relay.toml", "check-config", good]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("two config files"), "{stderr}");
}

#[test]
fn a_key_file_readable_by_others_is_reported_once() {
    let dir = ferry_testkit::temp_dir("relay-cli").unwrap();
    let path = config(dir.path(), "[xdp]\nmode = \"off\"\n");
    let key = dir.path().join("relay.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("mode 0640").count(), 1, "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn a_second_relay_on_a_port_in_use_does_not_start() {
    let bin = workspace_binary("ferry-relay", "ferry-relay").unwrap();
    let auth = Authority::new().unwrap();
    let cfg = RelayConfig::loopback(vec![auth.gateway_key()]).unwrap();
    let first = RelayProcess::start(&bin, &auth.relay_key, &cfg).unwrap();
    // The same UDP port, its own admin port: only the UDP check can stop it.
    let second = RelayConfig {
        admin: RelayConfig::loopback(vec![auth.gateway_key()])
            .unwrap()
            .admin,
        ..cfg.clone()
    };
    let e = RelayProcess::start(&bin, &auth.relay_key, &second).expect_err("started twice");
    let text = format!("{e:#}");
    assert!(
        text.contains(&format!(
            "relay.listen: {} is already in use",
            cfg.listen[0]
        )),
        "{text}"
    );
    // The first relay still answers.
    assert!(
        first.metrics().contains("ferry_"),
        "the first relay stopped answering"
    );
}
