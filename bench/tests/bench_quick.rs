//! `ferry-bench run --quick` end to end at a tiny load, on its namespace topology: the JSON
//! result validates against docs/bench-result.schema.json, the figures that must be non-zero
//! are, every stage's counts hold together, and every ratio is computed from this run's
//! values.

use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ferry_bench::harness::schema;
use ferry_testkit::gateway::workspace_binary;
use ferry_testkit::skip::require_root;
use serde_json::Value;

/// Held by each test for its whole run: both pin the forwarder to CPU 1 and the load to CPU 0,
/// so run side by side each would measure the other (a scale trial lost everything once).
static ONE_BENCH_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_bench_at_a_time() -> MutexGuard<'static, ()> {
    // A test that failed while holding it says so itself; the other may still run.
    ONE_BENCH_AT_A_TIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// What one `ferry-bench` run left: its output directory, its process id, and its result.
struct BenchRun {
    out: ferry_testkit::TempDir,
    pid: u32,
    result: Value,
}

/// Runs `ferry-bench` with `args`, the workspace's `ferry-relay` and a fresh output directory
/// named after `name`; asserts that it succeeded and that its result.json matches the schema.
fn run_bench(name: &str, args: &[&str]) -> BenchRun {
    let relay = workspace_binary("ferry-relay", "ferry-relay").expect("building ferry-relay");
    let out = ferry_testkit::temp_dir(name).expect("a temporary directory");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(args)
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
    BenchRun { out, pid, result }
}

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
    // On a loaded machine a forwarder descheduled past the end-of-trial wait (30 ms without
    // arrivals) counts the last datagrams of the trial before in this one: 5 % of slack, as
    // much as the loss these tests let a trial have. Socket drops are left out of the bound:
    // Ferry learns of its socket's drops only with the next datagram it reads (the kernel's
    // drop counter rides on each received datagram), so drops at the end of a trial that
    // overflowed the socket are counted in the next trial.
    let stale = num(t, "stale");
    assert!(
        rx <= sent + stale + 16.0 + sent * 0.05,
        "{path} {what}: relay in {rx} > sent {sent} + stale {stale}"
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
        "ferry" | "ferry-fast" => {
            assert_eq!(source, "metrics", "Ferry's stages come from its /metrics")
        }
        _ => assert_eq!(source, "kernel"),
    }
    let fast = num(relay, "fast_forwarded");
    assert!(
        fast <= fwd,
        "{path} {what}: fast-forwarded {fast} > forwarded {fwd}"
    );
    match path {
        // The fast path forwards inside XDP: the relay process may not run at all, and XDP's
        // own time is counted per run.
        "ferry-fast" => {
            assert!(
                fast > 0.0,
                "{path} {what}: nothing went through the fast path"
            );
            assert!(
                t["relay_cpu_ns_per_packet"].as_f64().is_some(),
                "{path} {what}: no relay CPU per packet"
            );
        }
        "direct" => {}
        _ => {
            assert_eq!(
                fast, 0.0,
                "{path} {what}: fast-forwarded without a fast path"
            );
            assert!(
                t["relay_cpu_ns_per_packet"]
                    .as_f64()
                    .is_some_and(|c| c > 0.0),
                "{path} {what}: no relay CPU per packet"
            );
        }
    }
    // The relay host's own time: its veths' NAPI threads (every path receives through them)
    // and the forwarder process, from schedstat in nanoseconds.
    if sent > 0.0 {
        assert!(
            t["relay_host_cpu_ns_per_packet"]
                .as_f64()
                .is_some_and(|c| c > 0.0),
            "{path} {what}: no relay host CPU per packet"
        );
    }
    // The host's busy time comes from /proc/stat, in clock ticks (10 ms): a short, light
    // trial (the low steady rate) can fall between them and show none.
    let host = num(t, "host_cpu_ns_per_packet");
    assert!(
        host > 0.0 || (host == 0.0 && sent < 50_000.0),
        "{path} {what}: host CPU {host} for {sent} datagrams"
    );
}

/// One kind of reply-path probe in one window: probes went out and came back, none is
/// unaccounted for, none failed (a REJECT), and the percentiles are in order. No figure is
/// held to a speed.
fn check_rtt(path: &str, what: &str, kind: &str, r: &Value) {
    let f = &r[kind];
    let (sent, answered, lost, failed) = (
        num(f, "sent"),
        num(f, "answered"),
        num(f, "lost"),
        num(f, "failed"),
    );
    assert!(
        sent > 0.0 && answered > 0.0,
        "{path} {what}: no {kind} probe answered: {r}"
    );
    assert!(
        sent >= answered + lost + failed,
        "{path} {what}: {kind} probes unaccounted for: {f}"
    );
    assert_eq!(failed, 0.0, "{path} {what}: a {kind} probe failed: {r}");
    let rtt = &f["rtt_us"];
    assert!(
        num(rtt, "p50") > 0.0 && num(rtt, "p50") <= num(rtt, "p99"),
        "{path} {what}: {kind} {rtt}"
    );
    assert!(
        num(rtt, "p99") <= num(rtt, "max"),
        "{path} {what}: {kind} {rtt}"
    );
}

/// The reply path's figures: on Ferry's columns an idle baseline and every latency point,
/// elsewhere none.
fn check_reply(path: &str, run: &Value) {
    let points = run["points"].as_array().expect("points");
    if !path.starts_with("ferry") {
        assert!(run["reply_idle"].is_null(), "{path}: reply_idle");
        assert!(points.iter().all(|p| p["reply"].is_null()), "{path}: reply");
        return;
    }
    let idle = &run["reply_idle"];
    for kind in ["bind", "keepalive"] {
        check_rtt(path, "idle", kind, idle);
    }
    assert!(
        num(idle, "relay_cpu_ns_per_second") > 0.0,
        "{path}: the probes cost the relay nothing? {idle}"
    );
    for p in points {
        let label = p["label"].as_str().expect("label");
        for kind in ["bind", "keepalive"] {
            check_rtt(path, label, kind, &p["reply"]);
        }
        assert!(num(&p["reply"], "seconds") > 0.0, "{path} {label}");
    }
}

/// Whether the relay's XDP fast path can run here: native XDP on veth, which the relay's own
/// tests also need (their skip policy says so when it is missing).
fn fast_path_expected(result: &Value) -> bool {
    !result["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .any(|s| s["path"] == "ferry-fast")
}

#[test]
#[ignore = "needs root: ferry-bench builds network namespaces"]
fn the_quick_profile_runs_end_to_end_and_its_report_holds_together() {
    require_root("the_quick_profile_runs_end_to_end_and_its_report_holds_together");
    let _alone = one_bench_at_a_time();
    let BenchRun { out, pid, result } = run_bench(
        "bench-quick",
        &[
            "run",
            "--quick",
            "--sessions",
            "3",
            "--search-steps",
            "3",
            // These tests check the report's mechanics, not the forwarders: on a loaded
            // machine even the search's lowest trial can lose a few of its datagrams, so up to
            // 5 % passes.
            "--max-loss",
            "0.05",
            "--trial-seconds",
            "0.3",
            "--latency-seconds",
            "0.3",
            "--rates",
            "2000",
            "--fractions",
            "0.1,0.5",
        ],
    );
    let summary = std::fs::read_to_string(out.path().join("summary.md")).expect("summary.md");
    assert!(summary.contains("| ferry |"));
    assert!(summary.contains("XDP ns/run"));
    // The idle policy is this machine's, in the JSON and in the summary's `idle:` line.
    let driver = std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver")
        .map(|d| d.trim().to_string())
        .ok()
        .filter(|d| !d.is_empty() && d != "none");
    assert_eq!(result["host"]["idle"]["driver"].as_str(), driver.as_deref());
    let idle_line = summary.lines().find(|l| l.starts_with("- idle: "));
    match &driver {
        Some(d) => assert!(idle_line.is_some_and(|l| l.contains(&format!("cpuidle {d}")))),
        None => assert!(idle_line.is_some_and(|l| l.contains("no cpuidle driver"))),
    }
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
    // The fast-path column is there whenever the fast path is active; otherwise the result
    // says why not.
    assert_eq!(
        paths.contains(&"ferry-fast"),
        fast_path_expected(&result),
        "ferry-fast is neither measured nor said to be skipped: {paths:?}"
    );
    let skipped = result["skipped"].as_array().expect("skipped");
    assert!(
        paths.contains(&"coturn") || skipped.iter().any(|s| s["path"] == "coturn"),
        "coturn is neither measured nor said to be skipped"
    );
    for run in runs {
        let path = run["path"].as_str().expect("path");
        // The generator's own ceiling is reported next to every result.
        let ceiling = &run["generator_ceiling"];
        assert!(
            num(ceiling, "offered_pps") > 0.0,
            "{path}: no generator ceiling"
        );
        check_trial(path, "at the generator's ceiling", ceiling);
        assert!(
            run["generator"]["gso"].is_boolean(),
            "{path}: generator.gso"
        );
        if path == "ferry-fast" {
            let xdp = &run["zero_loss"]["at_rate"]["xdp_ns_per_run"];
            assert!(
                xdp.is_null() || xdp.as_f64().is_some_and(|x| x > 0.0),
                "XDP ns per run: {xdp}"
            );
        }
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
        if path.starts_with("ferry") {
            assert!(num(&run["setup"], "binds_per_second") > 0.0);
        }
        check_reply(path, run);
    }
    assert!(
        summary.contains("Reply path") && summary.contains("| ferry | idle |"),
        "summary.md has the reply path's table"
    );
    assert_eq!(num(&result["config"], "probe_rate"), 20.0, "the default");

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
            "host_cpu_ns_per_packet" => trial["host_cpu_ns_per_packet"].as_f64(),
            "relay_host_cpu_ns_per_packet" => trial["relay_host_cpu_ns_per_packet"].as_f64(),
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
        let column = r["path"].as_str().expect("path");
        assert!(column == "ferry" || column == "ferry-fast", "{r}");
        let ferry = value_in(column, figure, point).expect("Ferry's value is in the run");
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
    let _alone = one_bench_at_a_time();
    let BenchRun { out, result, .. } = run_bench(
        "bench-scale",
        &[
            "run",
            "scale",
            "flood",
            "workers",
            "--quick",
            "--scale-sessions",
            "1,40",
            "--max-workers",
            "2",
            // Two halvings: the relay's receive processing shares its CPU with it, and a blast
            // can leave the first halving above what that CPU forwards.
            "--search-steps",
            "2",
            "--trial-seconds",
            "0.3",
            "--max-loss",
            "0.05",
            "--latency-seconds",
            "0.3",
            "--flood-legit-rate",
            "1000",
        ],
    );
    assert!(
        result["runs"].as_array().expect("runs").is_empty(),
        "scale, flood and workers measure no other path"
    );
    // The flood: guard off, then on, each without and with the flood.
    let flood = result["flood"].as_array().expect("flood");
    let cases: Vec<(bool, bool)> = flood
        .iter()
        .map(|r| (r["guard"] == true, r["flood"] == true))
        .collect();
    assert_eq!(
        cases,
        [(false, false), (false, true), (true, false), (true, true)]
    );
    for run in flood {
        let what = format!("flood, guard {}, flood {}", run["guard"], run["flood"]);
        assert!(num(&run["trial"], "sent") > 0.0, "{what}: {run}");
        let (drops, challenges) = (
            num(run, "xdp_drops_per_second"),
            num(run, "xdp_challenges_per_second"),
        );
        if run["flood"] == true {
            assert!(num(run, "flood_pps") > 0.0, "{what}: {run}");
        }
        if run["guard"] == true && run["flood"] == true {
            // The spoofed BINDs carry no cookie: the guard answers them itself.
            assert!(challenges > 0.0, "{what}: no CHALLENGE from XDP: {run}");
        } else if run["guard"] == false {
            assert_eq!((drops, challenges), (0.0, 0.0), "{what}: {run}");
        }
    }
    let summary_md = std::fs::read_to_string(out.path().join("summary.md")).expect("summary.md");
    assert!(summary_md.contains("CHALLENGEs from XDP/s"), "{summary_md}");
    let workers = result["workers"].as_array().expect("workers");
    let cpus = num(&result["host"], "cpus").min(2.0);
    let counts: Vec<f64> = workers.iter().map(|r| num(r, "workers")).collect();
    assert_eq!(
        counts,
        (1..=cpus as usize).map(|w| w as f64).collect::<Vec<_>>()
    );
    for run in workers {
        assert_eq!(run["path"], "ferry");
        assert!(num(&run["zero_loss"], "pps") > 0.0);
        check_trial("ferry", "workers", &run["zero_loss"]["at_rate"]);
    }
    let summary = std::fs::read_to_string(out.path().join("summary.md")).expect("summary.md");
    assert!(summary.contains("## Worker scaling"));
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

#[test]
#[ignore = "needs root: ferry-bench builds network namespaces"]
fn behind_the_xdp_wire_every_path_forwards_and_ferry_answers() {
    require_root("behind_the_xdp_wire_every_path_forwards_and_ferry_answers");
    let _alone = one_bench_at_a_time();
    let BenchRun { out, result, .. } = run_bench(
        "bench-wire",
        &[
            "run",
            "rates",
            "--xdp-wire",
            "--paths",
            "direct,ferry,ferry-fast",
            "--payloads",
            "64",
            "--sessions",
            "2",
            "--rates",
            "2000",
            "--max-loss",
            "0.05",
            "--latency-seconds",
            "0.3",
            "--trial-seconds",
            "0.3",
            "--probe-rate",
            "10",
        ],
    );
    let summary = std::fs::read_to_string(out.path().join("summary.md")).expect("summary.md");
    assert!(summary.contains("an XDP wire"), "the topology says so");
    let runs = result["runs"].as_array().expect("runs");
    let paths: Vec<&str> = runs.iter().filter_map(|r| r["path"].as_str()).collect();
    assert!(
        paths.contains(&"direct") && paths.contains(&"ferry"),
        "{paths:?}"
    );
    assert_eq!(
        paths.contains(&"ferry-fast"),
        fast_path_expected(&result),
        "ferry-fast is neither measured nor said to be skipped: {paths:?}"
    );
    for run in runs {
        let path = run["path"].as_str().expect("path");
        for p in run["points"].as_array().expect("points") {
            let label = p["label"].as_str().expect("label");
            // Through the wire one way (the datagrams) …
            check_trial(path, label, &p["trial"]);
        }
        // … and back (binds and keepalives, answered across the wire).
        check_reply(path, run);
    }
}
