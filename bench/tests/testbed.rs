//! `ferry-bench run --testbed FILE` end to end on loopback, standing in for real machines:
//! two `ferry-bench agent` processes (a generator's and a sink's), a plain forwarder the
//! "operator" started, and a real `ferry-relay` the coordinator starts itself from the file's
//! `relay.command`. A tiny profile (seconds); the JSON result validates against the schema and
//! its stages hold together. Also: a bad file is refused whole before anything runs, and an
//! agent process refuses a coordinator with another secret and a secret file others can read.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use ferry_bench::harness::agent::{AgentClient, Request, Secret};
use ferry_bench::harness::schema;
use ferry_core::keys::{GatewaySigningKey, RelayStaticKey};
use ferry_testkit::gateway::workspace_binary;
use ferry_testkit::relay::RelayConfig;
use serde_json::Value;

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_secret(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Starts `ferry-bench agent` on a free loopback port: the process and its address.
fn agent(secret: &Path) -> (Killed, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(["agent", "--listen", "127.0.0.1:0", "--secret-file"])
        .arg(secret)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting an agent");
    let stdout = child.stdout.take().expect("its stdout");
    let child = Killed(child);
    // It prints its address once it listens (or exits, which ends the line empty).
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the agent's first line");
    let addr = line
        .trim()
        .strip_prefix("ferry-bench agent listening on ")
        .unwrap_or_else(|| panic!("the agent said {line:?}"))
        .parse()
        .expect("an address");
    (child, addr)
}

fn num(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

/// What must hold in every trial whatever the machine's load.
fn check_trial(path: &str, what: &str, t: &Value) {
    let (sent, sink) = (num(t, "sent"), num(t, "sink_received"));
    assert!(sent > 0.0 && sink > 0.0, "{path} {what}: {t}");
    let relay = &t["relay"];
    let (rx, drops, fwd) = (
        num(relay, "received"),
        num(relay, "socket_drops"),
        num(relay, "forwarded"),
    );
    let lost =
        num(t, "lost_before_relay") + drops + num(t, "lost_in_relay") + num(t, "lost_after_relay");
    assert_eq!(lost, sent - sink, "{path} {what}: losses do not add up");
    match path {
        "ferry" => {
            assert_eq!(relay["source"], "metrics", "{path} {what}");
            assert!(
                rx > 0.0 && fwd > 0.0,
                "{path} {what}: the relay counted nothing"
            );
            // Socket drops are left out of the bound: Ferry learns of its socket's drops only
            // with the next datagram it reads, so drops at the end of a trial that overflowed
            // show in the next trial's count (docs/bench.md, "Reading the report").
            assert!(rx <= sent + num(t, "stale") + 16.0, "{path} {what}");
            assert!(
                sink <= fwd + 16.0,
                "{path} {what}: sink {sink} > relay out {fwd}"
            );
            assert!(
                t["relay_cpu_ns_per_packet"]
                    .as_f64()
                    .is_some_and(|c| c > 0.0),
                "{path} {what}: the coordinator started the relay, so its CPU is measured"
            );
        }
        _ => {
            assert_eq!(relay["source"], "none", "{path} {what}");
            assert_eq!((rx, fwd), (sink, sink), "{path} {what}");
        }
    }
    let lat = &t["latency_us"];
    assert!(
        num(lat, "p50") > 0.0 && num(lat, "p50") <= num(lat, "max"),
        "{lat}"
    );
}

#[test]
fn a_testbed_file_drives_agents_in_other_processes_against_a_real_relay() {
    let relay_bin = workspace_binary("ferry-relay", "ferry-relay").expect("building ferry-relay");
    let dir = ferry_testkit::temp_dir("testbed-e2e").expect("a temporary directory");
    let d = dir.path();
    let secret = d.join("agent.secret");
    write_secret(&secret, "a testbed secret of more than 32 bytes\n", 0o600);
    let rng = ring::rand::SystemRandom::new();
    let gateway = GatewaySigningKey::generate(&rng).expect("gateway key");
    ferry_keyfile::write_secret_file(&d.join("gateway.key"), &gateway, false).expect("gw key");
    let relay_key = RelayStaticKey::generate(&rng).expect("relay key");
    ferry_keyfile::write_public_file(&d.join("relay.key.pub"), &relay_key.public(), false)
        .expect("relay public key");
    ferry_keyfile::write_secret_file(&d.join("relay.key"), &relay_key, false).expect("relay key");
    let config = RelayConfig::loopback(vec![(7, gateway.public())]).expect("a relay config");
    std::fs::write(d.join("relay.toml"), config.text()).expect("relay.toml");

    let (_generator, generator_addr) = agent(&secret);
    let (_sink, sink_agent_addr) = agent(&secret);
    let lo = "127.0.0.1".parse().expect("lo");
    let sink_addr = SocketAddr::new(lo, ferry_testkit::free_port(lo).expect("a port"));
    let plain_addr = SocketAddr::new(lo, ferry_testkit::free_port(lo).expect("a port"));
    let _plain = Killed(
        Command::new(env!("CARGO_BIN_EXE_ferry-plainfwd"))
            .args(["--listen", &plain_addr.to_string()])
            .args(["--to", &sink_addr.to_string(), "--seconds", "120"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting ferry-plainfwd"),
    );

    let file = d.join("testbed.toml");
    std::fs::write(
        &file,
        format!(
            r#"secret_file = "agent.secret"

[relay]
generator_side = "{listen}"
admin = "{admin}"
id = {id}
public_key_file = "relay.key.pub"
command = ["{relay}", "--config", "{config}"]

[gateway]
signing_key_file = "gateway.key"
kid = 7
session_rate_bytes = 100000000

[[agents]]
name = "gen"
control = "{generator_addr}"

[[agents]]
name = "sink"
control = "{sink_agent_addr}"

[[lanes]]
generator = "gen"
generator_ip = "127.0.0.1"
sink = "sink"
sink_addr = "{sink_addr}"

[load]
paths = ["direct", "plain", "ferry"]
payloads = ["64"]
sessions = 3
trial_seconds = 0.2
latency_seconds = 0.2
# Up to four halvings: on loopback the relay takes the generator's GSO bursts whole (UDP GRO),
# so the ceiling is what the sink keeps up with, and under load two trials could both lose.
search_steps = 4
fractions = [0.5]
low_rate = 500
rates = [2000]
clock_tolerance_us = 2000

[baselines]
plain = "{plain_addr}"
"#,
            listen = config.listen[0],
            admin = config.admin,
            id = config.relay_id,
            relay = relay_bin.display(),
            config = d.join("relay.toml").display(),
        ),
    )
    .expect("testbed.toml");

    let out = d.join("out");
    let status = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(["run", "--testbed"])
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("running ferry-bench");
    assert!(status.success(), "ferry-bench failed: {status}");

    let text = std::fs::read_to_string(out.join("result.json")).expect("result.json");
    let result: Value = serde_json::from_str(&text).expect("JSON");
    schema::validate(&result).expect("result.json matches docs/bench-result.schema.json");
    let summary = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(
        summary.contains("## Testbed") && summary.contains("| ferry |"),
        "{summary}"
    );
    assert!(!summary.contains("forwarders on CPU"), "{summary}");

    let bed = &result["testbed"];
    assert_eq!(bed["relay"]["started_by_coordinator"], true);
    let agents = bed["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 2);
    for a in agents {
        assert_eq!(a["clock"], "realtime", "{a}");
        // One machine, one clock: the estimate is within its own uncertainty, give or take.
        let offset = num(a, "clock_offset_us").abs();
        assert!(offset <= num(a, "clock_uncertainty_us") + 1000.0, "{a}");
    }
    assert_eq!(bed["lanes"][0]["latency"], "one-way across clocks");

    let runs = result["runs"].as_array().expect("runs");
    let paths: Vec<&str> = runs.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(paths, ["direct", "plain", "ferry"]);
    for run in runs {
        let path = run["path"].as_str().expect("path");
        let zero = &run["zero_loss"];
        assert!(num(zero, "pps") > 0.0, "{path}: no zero-loss rate");
        check_trial(path, "at the zero-loss rate", &zero["at_rate"]);
        let points = run["points"].as_array().expect("points");
        // 50 %, the low rate, one fixed rate.
        assert_eq!(points.len(), 3, "{path}: {points:?}");
        for p in points {
            check_trial(path, p["label"].as_str().expect("label"), &p["trial"]);
        }
        if path == "ferry" {
            assert!(num(&run["setup"], "binds_per_second") > 0.0);
            assert!(num(&run["setup"], "rss_after_bytes") > 0.0);
        }
    }
    let ratios = result["ratios"].as_array().expect("ratios");
    for base in ["direct", "plain"] {
        assert!(
            ratios
                .iter()
                .any(|r| r["baseline"] == base && r["figure"] == "zero_loss_pps"),
            "no zero-loss ratio against {base}"
        );
    }
    let capacity = result["capacity"].as_array().expect("capacity");
    assert!(
        capacity.iter().all(|c| c
            .as_str()
            .is_some_and(|c| c.contains("through the relay under test"))),
        "{capacity:?}"
    );
}

#[test]
fn a_bad_testbed_file_is_refused_whole_before_anything_runs() {
    let dir = ferry_testkit::temp_dir("testbed-bad").expect("a temporary directory");
    let file = dir.path().join("testbed.toml");
    std::fs::write(
        &file,
        r#"secret_file = "missing.secret"
[relay]
generator_side = "127.0.0.1:7000"
admin = "127.0.0.1:9477"
id = 1
public_key_file = "missing.pub"
[[agents]]
name = "a"
control = "127.0.0.1:1"
[[lanes]]
generator = "a"
generator_ip = "127.0.0.1"
sink = "b"
sink_addr = "127.0.0.1:9000"
[load]
paths = ["ferry", "tokio"]
"#,
    )
    .expect("testbed.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(["run", "--testbed"])
        .arg(&file)
        .output()
        .expect("running ferry-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for says in [
        "secret_file: reading the agent secret file",
        "relay.public_key_file",
        "lanes[0].sink: no agent named \"b\"",
        "\"tokio\": direct, plain or ferry",
        "[gateway]: the ferry path needs",
    ] {
        assert!(err.contains(says), "{says:?} not in:\n{err}");
    }
}

#[test]
fn an_agent_process_refuses_another_secret_and_an_open_secret_file() {
    let dir = ferry_testkit::temp_dir("testbed-agent").expect("a temporary directory");
    let secret = dir.path().join("agent.secret");
    write_secret(&secret, "the agent's own secret, 32 bytes or more", 0o600);
    let (_agent, addr) = agent(&secret);
    let other = Secret::from_bytes(b"somebody else's secret, 32 bytes or more").expect("secret");
    let mut c = AgentClient::connect("agent", addr, &other).expect("a TCP connection");
    let err = c.call(&Request::Hello {}).expect_err("refused");
    assert!(format!("{err}").contains("not authenticated"), "{err}");
    let mine = Secret::load(&secret).expect("the secret");
    let mut c = AgentClient::connect("agent", addr, &mine).expect("a TCP connection");
    c.call(&Request::Hello {})
        .expect("served with the right secret");

    let open = dir.path().join("open.secret");
    write_secret(&open, "a secret that others may read, 32 bytes", 0o644);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(["agent", "--listen", "127.0.0.1:0", "--secret-file"])
        .arg(&open)
        .output()
        .expect("running an agent");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
