//! `ferry-bench run --quick` end to end at a tiny load, on its namespace topology: the JSON
//! result validates against docs/bench-result.schema.json, the figures that must be non-zero
//! are, every stage's counts hold together, and every ratio is computed from this run's
//! values.

use std::process::Command;

use ferry_bench::harness::schema;
use ferry_testkit::gateway::workspace_binary;
use ferry_testkit::skip::require_root;
use serde_json::Value;

fn num(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

/// Counts of one trial that must hold together whatever the machine's load.
fn check_trial(path: &str, what: &str, t: &Value) {
    let sent = num(t, "sent");
    let relay = &t["relay"];
    let (rx, drops, fwd) = (
        num(relay, "received"),
        num(relay, "socket_drops"),
        num(relay, "forwarded"),
    );
    let sink = num(t, "sink_received");
    assert!(sent > 0.0, "{path} {what}: nothing sent");
    assert!(sink > 0.0, "{path} {what}: nothing arrived at the sink");
    // Each stage sees at most what the one before it passed on, give or take what an
    // earlier trial left queued in the forwarder (it reached the sink as `stale`) and a
    // little slack for the kernel's counters, which also count the odd set-up datagram.
    let stale = num(t, "stale");
    assert!(
        rx + drops <= sent + stale + 16.0,
        "{path} {what}: relay in {rx}+{drops} > sent {sent} + stale {stale}"
    );
    assert!(
        sink <= fwd + 16.0,
        "{path} {what}: sink {sink} > relay out {fwd}"
    );
    assert!(
        rx > 0.0 && fwd > 0.0,
        "{path} {what}: the relay stage did not count"
    );
    let lost =
        num(t, "lost_before_relay") + drops + num(t, "lost_in_relay") + num(t, "lost_after_relay");
    assert_eq!(lost, sent - sink, "{path} {what}: losses do not add up");
    let loss = num(t, "loss");
    assert!(
        (loss - (sent - sink).max(0.0) / sent).abs() < 1e-9,
        "{path} {what}: loss {loss} is not (sent − sink) / sent"
    );
    let source = relay["source"].as_str().unwrap_or_default();
    match path {
        "ferry" => assert_eq!(source, "metrics", "Ferry's stages come from its /metrics"),
        _ => assert_eq!(source, "kernel"),
    }
    if path != "direct" {
        assert!(
            t["relay_cpu_ns_per_packet"]
                .as_f64()
                .is_some_and(|c| c > 0.0),
            "{path} {what}: no relay CPU per packet"
        );
    }
}

#[test]
#[ignore = "needs root: ferry-bench builds network namespaces"]
fn the_quick_profile_runs_end_to_end_and_its_report_holds_together() {
    require_root("the_quick_profile_runs_end_to_end_and_its_report_holds_together");
    let relay = workspace_binary("ferry-relay", "ferry-relay").expect("building ferry-relay");
    let out = ferry_testkit::temp_dir("bench-quick").expect("a temporary directory");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(["run", "--quick", "--sessions", "3", "--search-steps", "2"])
        // These tests check the report's mechanics, not the forwarders: on a loaded machine
        // even the search's lowest trial can lose a few of its datagrams, so up to 5 % passes.
        .args(["--max-loss", "0.05"])
        .args(["--trial-seconds", "0.3", "--latency-seconds", "0.3"])
        .args(["--rates", "2000", "--fractions", "0.1,0.5"])
        .arg("--relay-bin")
        .arg(&relay)
        .arg("--out")
        .arg(out.path())
        .spawn()
        .expect("running ferry-bench");
    let pid = child.id();
    let status = child.wait().expect("waiting for ferry-bench");
    assert!(status.success(), "ferry-bench failed: {status}");
    let text = std::fs::read_to_string(out.path().join("result.json")).expect("result.json");
    let result: Value = serde_json::from_str(&text).expect("result.json is JSON");
    schema::validate(&result).expect("result.json matches docs/bench-result.schema.json");
    let summary = std::fs::read_to_string(out.path().join("summary.md")).expect("summary.md");
    assert!(summary.contains("| ferry |"));
    for chart in ["throughput.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.path().join(chart)).expect("a chart");
        assert!(svg.starts_with("<svg") && svg.contains("ferry"), "{chart}");
        assert!(
            summary.contains(&format!("]({chart})")),
            "summary.md links {chart}"
        );
    }

    let runs = result["runs"].as_array().expect("runs");
    let paths: Vec<&str> = runs.iter().filter_map(|r| r["path"].as_str()).collect();
    for p in ["direct", "plain", "tokio", "ferry"] {
        assert!(paths.contains(&p), "{p} was not measured: {paths:?}");
    }
    let skipped = result["skipped"].as_array().expect("skipped");
    assert!(
        paths.contains(&"coturn") || skipped.iter().any(|s| s["path"] == "coturn"),
        "coturn is neither measured nor said to be skipped"
    );
    for run in runs {
        let path = run["path"].as_str().expect("path");
        let zero = &run["zero_loss"];
        assert!(num(zero, "pps") > 0.0, "{path}: no zero-loss rate");
        check_trial(path, "at the zero-loss rate", &zero["at_rate"]);
        let points = run["points"].as_array().expect("points");
        // 10 %, 50 %, the low rate and one fixed rate.
        assert_eq!(points.len(), 4, "{path}: {points:?}");
        for p in points {
            let label = p["label"].as_str().expect("label");
            check_trial(path, label, &p["trial"]);
            let lat = &p["trial"]["latency_us"];
            assert!(num(lat, "p50") > 0.0 && num(lat, "p50") <= num(lat, "p99"));
            assert!(num(lat, "p99") <= num(lat, "max"));
        }
        if path == "ferry" {
            assert!(num(&run["setup"], "binds_per_second") > 0.0);
        }
    }

    // Every ratio is Ferry's value over the baseline's, both as measured in this run.
    let ratios = result["ratios"].as_array().expect("ratios");
    let value_in = |path: &str, figure: &str, point: &str| -> Option<f64> {
        let run = runs.iter().find(|r| r["path"] == path)?;
        let trial = match point {
            "zero_loss" => &run["zero_loss"]["at_rate"],
            _ => &run["points"]
                .as_array()?
                .iter()
                .find(|p| point_name(p) == point)?["trial"],
        };
        match figure {
            "zero_loss_pps" => run["zero_loss"]["pps"].as_f64(),
            "relay_cpu_ns_per_packet" => trial["relay_cpu_ns_per_packet"].as_f64(),
            "p50_us" => trial["latency_us"]["p50"].as_f64(),
            "p99_us" => trial["latency_us"]["p99"].as_f64(),
            "p999_us" => trial["latency_us"]["p999"].as_f64(),
            other => panic!("unknown figure {other}"),
        }
    };
    for base in ["direct", "plain", "tokio"] {
        assert!(
            ratios
                .iter()
                .any(|r| r["baseline"] == base && r["figure"] == "zero_loss_pps"),
            "no zero-loss ratio against {base}"
        );
    }
    for r in ratios {
        let (figure, point) = (
            r["figure"].as_str().expect("figure"),
            r["point"].as_str().expect("point"),
        );
        let base = r["baseline"].as_str().expect("baseline");
        let ferry = value_in("ferry", figure, point).expect("Ferry's value is in the run");
        let baseline = value_in(base, figure, point).expect("the baseline's value is in the run");
        assert_eq!(num(r, "ferry"), ferry, "{r}");
        assert_eq!(num(r, "baseline_value"), baseline, "{r}");
        assert!((num(r, "ratio") - ferry / baseline).abs() < 1e-9, "{r}");
    }
    assert!(
        !result["capacity"].as_array().expect("capacity").is_empty(),
        "no capacity line"
    );
    // Its namespaces are gone.
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let tag = format!("-{pid}-");
    let listing = String::from_utf8_lossy(&left.stdout);
    assert!(
        !listing
            .lines()
            .any(|l| l.starts_with("ferry-b") && l.contains(&tag)),
        "namespaces left behind: {listing}"
    );
}

/// A point's name as the ratios give it: its label, or `fixed N`.
fn point_name(p: &Value) -> String {
    match p["label"].as_str() {
        Some("fixed") => format!("fixed {}", p["trial"]["target_pps"]),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

#[test]
#[ignore = "needs root: ferry-bench builds network namespaces"]
fn the_scale_and_flood_scenarios_bind_measure_and_count_the_guard() {
    require_root("the_scale_and_flood_scenarios_bind_measure_and_count_the_guard");
    let relay = workspace_binary("ferry-relay", "ferry-relay").expect("building ferry-relay");
    let out = ferry_testkit::temp_dir("bench-scale").expect("a temporary directory");
    let status = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args([
            "run",
            "scale",
            "flood",
            "--quick",
            "--scale-sessions",
            "1,40",
        ])
        .args(["--search-steps", "1", "--trial-seconds", "0.3"])
        .args(["--max-loss", "0.05"])
        .args(["--latency-seconds", "0.3", "--flood-legit-rate", "1000"])
        .arg("--relay-bin")
        .arg(&relay)
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("running ferry-bench");
    assert!(status.success(), "ferry-bench failed: {status}");
    let text = std::fs::read_to_string(out.path().join("result.json")).expect("result.json");
    let result: Value = serde_json::from_str(&text).expect("result.json is JSON");
    schema::validate(&result).expect("result.json matches docs/bench-result.schema.json");
    assert!(
        result["runs"].as_array().expect("runs").is_empty(),
        "scale and flood measure no other path"
    );
    let svg = std::fs::read_to_string(out.path().join("scale.svg")).expect("the scale chart");
    assert!(svg.starts_with("<svg"));
    let scale = result["scale"].as_array().expect("scale");
    let counts: Vec<f64> = scale.iter().map(|r| num(r, "sessions")).collect();
    assert_eq!(counts, [1.0, 40.0]);
    for run in scale {
        assert_eq!(run["path"], "ferry");
        let setup = &run["setup"];
        assert!(num(setup, "binds_per_second") > 0.0);
        assert!(num(setup, "rss_after_bytes") > 0.0);
        assert!(num(&run["zero_loss"], "pps") > 0.0);
        check_trial(
            "ferry",
            "at the zero-loss rate",
            &run["zero_loss"]["at_rate"],
        );
    }
}
